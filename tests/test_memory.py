"""A synchronized layer saves for backward what nn.BatchNorm saves: the input plus per-channel vectors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel, SavedTensorsLedger


def saved_bytes(layer: nn.Module, x: torch.Tensor, replicas: int) -> list:
    ledger = SavedTensorsLedger(layer)
    EmulatedDataParallel(ledger, replicas)(x.requires_grad_()).sum().backward()
    return [size for _, size in ledger.records]


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
