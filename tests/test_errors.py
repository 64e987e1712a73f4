"""Replicas that disagree or fail end the forward with a clear error, fast, and never hang."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

import autosyncbn
import autosyncbn.testing
from autosyncbn.testing import EmulatedDataParallel

pytestmark = [pytest.mark.usefixtures("installed"), pytest.mark.timeout(30)]


class BranchOnSliceSize(nn.Module):
    """A model whose replicas diverge: the smaller last slice takes another path."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a = nn.BatchNorm1d(4)
        self.b = nn.BatchNorm1d(4)
        self.wide = nn.BatchNorm1d(6)
        self.proj = nn.Linear(4, 6)

    def forward(self, x):
        small = x.shape[0] < 3
        if self.mode == "fewer_calls":
            x = self.a(x)
            return x if small else self.b(x)
        if self.mode == "other_layer":
            return self.b(x) if small else self.a(x)
        if self.mode == "other_channels":
            return self.wide(self.proj(x)) if small else self.a(x)
        if self.mode == "raise_before":
            if small:
                raise ArithmeticError("replica-specific failure before BatchNorm")
            return self.a(x)
        if self.mode == "raise_between":
            x = self.a(x)
            if small:
                raise ArithmeticError("replica-specific failure between BatchNorm calls")
            return self.b(x)
        if self.mode == "no_batchnorm":
            return x if small else self.a(x)
        raise AssertionError(self.mode)


def run_expecting(mode, error_type, *fragments):
    model = BranchOnSliceSize(mode)
    parallel = EmulatedDataParallel(model, 4)
    x = torch.randn(10, 4)  # slices 3, 3, 3, 1
    start = time.monotonic()
    with pytest.raises(error_type) as info:
        parallel(x)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"took {elapsed:.1f}s to fail"
    # The failing replica's own exception, with its peers' view (replica, call, layer) chained.
    message = " ".join(str(e) for e in (info.value, info.value.__cause__) if e is not None)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message}"
    # The next forward works normally.
    model.mode = "fewer_calls"
    healthy = EmulatedDataParallel(model, 4)(torch.randn(12, 4))
    assert healthy.shape == (12, 4)
    return message


def test_fewer_calls_in_one_replica():
    run_expecting("fewer_calls", autosyncbn.ReplicaMismatchError, "replica 3", "call 1", "'b'")


def test_different_layer_at_same_call():
    run_expecting("other_layer", autosyncbn.ReplicaMismatchError, "call 0", "'a'", "'b'", "replica 3")


def test_different_channel_count_at_same_call():
    run_expecting("other_channels", autosyncbn.ReplicaMismatchError, "6 channels", "4 channels", "'wide'")


def test_replica_raising_before_batchnorm():
    # The caller sees the failing replica's own error; the peers' PeerFailedError,
    # chained to it, names the replica that raised and the call they waited at.
    run_expecting("raise_before", ArithmeticError, "replica 3", "ArithmeticError",
                  "replica-specific failure before")


def test_replica_raising_between_batchnorm_calls():
    run_expecting("raise_between", ArithmeticError, "replica 3", "call 1", "'b'",
                  "replica-specific failure between")


def _group(replicas: int, timeout: float) -> autosyncbn.group.ReplicaGroup:
    plan = autosyncbn.replicas.ReplicaPlan(timeout, include_plain=True)
    return autosyncbn.group.ReplicaGroup(replicas, timeout, plan, lambda: ["<root>", "layer1.bn"])


def _contribution(count: int, channels: int = 3) -> autosyncbn.group.Contribution:
    """Layer 1 ('layer1.bn') with ``count`` values per channel."""
    x = torch.randn(count, channels)
    return autosyncbn.group.Contribution(layer=1, channels=channels, count=count,
                                         moments=autosyncbn.moments.local_moments(x), input=x, weight=None,
                                         bias=None, eps=1e-5, packed=None)


def test_peer_error_names_the_failing_replica_and_call():
    # Replica 0 waits at call 0 while replica 1 has raised; its error names it.
    group = _group(2, timeout=5)
    group.replica_finished(1, ArithmeticError("boom"))
    with pytest.raises(autosyncbn.PeerFailedError, match=r"replica 0 was waiting at BatchNorm call 0 \(layer 'layer1.bn'\), but replica 1 raised.*ArithmeticError: boom") as info:
        group.meet(0, 0, _contribution(4))
    assert info.value.__cause__ is None and info.value.__context__ is None  # nothing to loop through


def test_replica_without_batchnorm_while_others_call_it():
    run_expecting("no_batchnorm", autosyncbn.ReplicaMismatchError, "replica 3", "0 call(s)")


def test_timeout_when_a_peer_never_arrives():
    group = _group(2, timeout=0.2)
    group.started[1] = True  # started, but never reaches the call
    start = time.monotonic()
    with pytest.raises(autosyncbn.SyncTimeoutError, match=r"replica 0 waited 0.2s at BatchNorm call 0 \(layer 'layer1.bn'\).*\[1\]"):
        group.meet(0, 0, _contribution(4))
    assert time.monotonic() - start < 2


def test_whole_batch_with_one_value_per_channel_raises_pytorch_error():
    layer = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        EmulatedDataParallel(layer, 4)(torch.randn(1, 3))


def test_one_value_per_channel_over_replicas_is_pytorch_error_too():
    # A runner of its own may hand a replica an empty slice: (1, 0) values per channel in all.
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    replicas = autosyncbn.testing.cpu_replicate(model, 2)
    errors = []

    def run(replica, x):
        try:
            replica(x)
        except ValueError as error:
            errors.append(error)

    with autosyncbn.patched():
        autosyncbn.replicas.register(replicas, autosyncbn.replicas.ReplicaPlan(5.0, include_plain=True))
        threads = [threading.Thread(target=run, args=(r, torch.randn(n, 3))) for r, n in zip(replicas, (1, 0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
    assert len(errors) == 2 and all("more than 1 value per channel" in str(e) for e in errors)


@pytest.mark.parametrize("bad_input,error", [
    (torch.randn(8), ValueError),                 # wrong rank
    (torch.randn(8, 5), RuntimeError),            # wrong channel count
    (torch.ones(8, 4, dtype=torch.long), RuntimeError),  # not floating point
])
def test_bad_input_raises_what_pytorch_raises(bad_input, error):
    layer = nn.BatchNorm1d(4)
    with pytest.raises(error):
        layer(bad_input.clone())  # PyTorch's own error type, outside DataParallel
    with pytest.raises(error):
        EmulatedDataParallel(layer, 2)(bad_input)

