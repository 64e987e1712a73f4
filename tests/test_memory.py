"""A synchronized layer saves for backward what nn.BatchNorm saves: the input plus per-channel vectors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel


class CountSavedBytes(nn.Module):
    """Counts what autograd packs for backward inside each replica's thread.

    ``saved_tensors_hooks`` are thread-local, so they are entered inside the
    replica's forward, in the replica's own thread. Every pack is counted,
    even a second pack of the same storage.
    """

    def __init__(self, inner: nn.Module, ledger: list) -> None:
        super().__init__()
        self.inner = inner
        self.ledger = ledger

    def forward(self, x):
        def pack(t):
            self.ledger.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return self.inner(x)


def saved_bytes(layer: nn.Module, x: torch.Tensor, replicas: int) -> list:
    ledger: list = []
    out = EmulatedDataParallel(CountSavedBytes(layer, ledger), replicas)(x.requires_grad_())
    out.sum().backward()
    return ledger


@pytest.mark.parametrize("shape,replicas", [((8, 16, 12, 12), 4), ((6, 32), 3), ((4, 8, 3, 6, 6), 2)])
def test_saved_bytes_match_plain_batchnorm(shape, replicas):
    channels = shape[1]
    layer_cls = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    x = torch.randn(*shape)
    plain = saved_bytes(layer_cls(channels), x.clone(), replicas)
    with autosyncbn.patched():
        synchronized = saved_bytes(layer_cls(channels), x.clone(), replicas)
    activation = x.numel() * x.element_size()
    vector = channels * 4
    large = [b for b in synchronized if b > 4 * vector]
    # One slice of the input per replica, as nn.BatchNorm: the whole input, once.
    assert sum(large) <= activation, (large, activation)
    # Everything else is per-channel vectors (a handful per replica).
    assert sum(synchronized) <= sum(plain) + 16 * vector * replicas, (sum(synchronized), sum(plain))
