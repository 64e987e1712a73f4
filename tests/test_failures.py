"""Failures end with errors or results, never a hang; the next forward works."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel

from distributed_helpers import run_ranks
from helpers import assert_close_to_scale

pytestmark = pytest.mark.timeout(60)


class FourBatchNorms(nn.Module):
    """Four BatchNorm calls; the replica holding the smallest slice may raise before call k."""

    def __init__(self, fail_before: int = -1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.BatchNorm1d(3) for _ in range(4))
        self.fail_before = fail_before

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            if index == self.fail_before and x.shape[0] == 1:
                raise OverflowError(f"replica failure before call {index}")
            x = layer(x) * 1.5 + 0.1
        return x


@pytest.mark.parametrize("fail_before", [0, 1, 2, 3])
def test_a_replica_raising_at_any_call_number(installed, fail_before):
    model = FourBatchNorms(fail_before)
    parallel = EmulatedDataParallel(model, 4)
    start = time.monotonic()
    with pytest.raises((OverflowError, autosyncbn.PeerFailedError)) as info:
        parallel(torch.randn(10, 3))  # slices 3, 3, 3, 1
    assert time.monotonic() - start < 2
    assert f"replica failure before call {fail_before}" in str(info.value)
    model.fail_before = -1
    reference = copy.deepcopy(model)
    x = torch.randn(10, 3)
    assert_close_to_scale(parallel(x), reference(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_as_in_pytorch(installed, bad):
    layer = nn.BatchNorm1d(3)
    reference = copy.deepcopy(layer)
    x = torch.randn(8, 3)
    x[5, 1] = bad
    out = EmulatedDataParallel(layer, 4)(x)
    expected = reference(x)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(layer.running_mean.isnan(), reference.running_mean.isnan())
    # Channels without the bad value are untouched by it.
    torch.testing.assert_close(out[:, [0, 2]], expected[:, [0, 2]])
    assert EmulatedDataParallel(nn.BatchNorm1d(3), 4)(torch.randn(8, 3)).isfinite().all()


def test_a_forward_that_calls_no_batchnorm(installed):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    out = EmulatedDataParallel(model, 4)(torch.randn(8, 3))
    assert out.shape == (8, 3)


def test_errors_leave_no_thread_waiting(installed):
    import threading

    before = threading.active_count()
    model = FourBatchNorms(fail_before=2)
    for _ in range(5):
        with pytest.raises((OverflowError, autosyncbn.PeerFailedError)):
            EmulatedDataParallel(model, 4)(torch.randn(10, 3))
    assert threading.active_count() <= before


def worker_rank_raises_before_collective(rank, world):
    layer = autosyncbn.SynchronizedBatchNorm1d(3)
    start = time.monotonic()
    if rank == 1:
        time.sleep(6)  # raised before BatchNorm and lingers; never joins the collective
        return
    with pytest.raises(Exception) as info:
        layer(torch.randn(4, 3))
    waited = time.monotonic() - start
    # Ends with the process group's own timeout (3 s here), not a hang.
    assert 2.0 < waited < 15.0, waited
    assert "imed out" in str(info.value) or "timeout" in str(info.value).lower(), info.value


def test_rank_that_never_reaches_batchnorm_ends_at_the_group_timeout():
    run_ranks(worker_rank_raises_before_collective, 2, pg_timeout=3.0, leave_together=False, deadline=60)


def worker_rank_with_empty_batch(rank, world):
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3)
    reference = copy.deepcopy(layer)
    model = autosyncbn.convert_model(nn.Sequential(layer))
    x_all = torch.randn(4, 3, 2, 2) * 3
    x = (x_all if rank == 0 else x_all[:0]).clone().requires_grad_()
    out = model(x)
    out.sum().backward()
    assert out.shape[0] == x.shape[0]
    expected = reference(x_all)
    if rank == 0:
        assert_close_to_scale(out, expected.detach())
    else:
        assert x.grad.numel() == 0 and torch.equal(layer.weight.grad, torch.zeros(3))
    assert_close_to_scale(layer.running_var, reference.running_var)


def test_rank_with_an_empty_batch_gets_results():
    run_ranks(worker_rank_with_empty_batch, 2)
