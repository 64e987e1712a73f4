"""autosyncbn.testing behaves like nn.DataParallel on N devices."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from autosyncbn.testing import EmulatedDataParallel, cpu_replicate, split_like_data_parallel


class Recorder(nn.Module):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x, scale=1.0):
        self.log.append((threading.current_thread().name, x.shape[0], torch.is_grad_enabled(),
                         torch.is_autocast_enabled("cpu")))
        return x * self.weight * scale


@pytest.mark.parametrize("batch,replicas,expected", [(10, 4, [3, 3, 3, 1]), (5, 8, [1] * 5), (8, 2, [4, 4]), (3, 1, [3])])
def test_split_matches_data_parallel_chunking(batch, replicas, expected):
    parts = split_like_data_parallel((torch.zeros(batch, 2),), replicas)
    assert [p[0].shape[0] for p in parts] == expected


def test_each_replica_runs_in_its_own_thread_with_callers_modes():
    log: list = []
    model = EmulatedDataParallel(Recorder(log), 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.ones(7, 2), scale=2.0)
    assert out.shape == (7, 2) and torch.all(out == 2)
    assert len({name for name, *_ in log}) == 3
    assert sorted(n for _, n, _, _ in log) == [1, 3, 3]
    assert all(grad is False and autocast is True for _, _, grad, autocast in log)


def test_gradients_reach_the_original_parameters():
    model = EmulatedDataParallel(Recorder([]), 4)
    model(torch.ones(8, 2)).sum().backward()
    assert model.module.weight.grad.item() == 16.0


def test_replicas_share_replica0_buffers_and_copy_the_rest():
    bn = nn.BatchNorm1d(2)
    replicas = cpu_replicate(bn, 3)
    assert replicas[0].running_mean is bn.running_mean
    assert replicas[1].running_mean is not bn.running_mean
    assert torch.equal(replicas[2].running_var, bn.running_var)


def test_exceptions_in_a_replica_reach_the_caller():
    class Fails(nn.Module):
        def forward(self, x):
            if x.shape[0] == 1:
                raise KeyError("only the small slice fails")
            return x

    with pytest.raises(KeyError, match="only the small slice fails"):
        EmulatedDataParallel(Fails(), 4)(torch.ones(10, 1))


def test_emulated_training_is_reproducible_run_to_run(installed):
    """Gradients of the replicas are summed in replica order, whatever the threads did."""
    import copy

    from helpers import ConvBlock, input_of_rank

    torch.manual_seed(0)
    initial = ConvBlock(4)
    inputs = [input_of_rank(4, 10) for _ in range(5)]
    finals = []
    for _ in range(2):
        model = copy.deepcopy(initial)
        parallel = EmulatedDataParallel(model, 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x in inputs:
            optimizer.zero_grad()
            parallel(x).mul(torch.arange(5.0).view(1, 5, 1, 1)).square().sum().backward()
            optimizer.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_functional_form_matches_the_module_form():
    from autosyncbn.testing import emulated_data_parallel

    log: list = []
    model = Recorder(log)
    out = emulated_data_parallel(model, torch.ones(6, 2), num_replicas=3, module_kwargs={"scale": 3.0})
    assert torch.equal(out, torch.full((6, 2), 3.0)) and len(log) == 3


openmp_only = pytest.mark.skipif(
    "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="only PyTorch's OpenMP backend gives every thread its own team of intra-op threads")


class CountsThreads(nn.Module):
    """Records torch.get_num_threads() in each replica's forward; can wait for peers, or fail in one replica."""

    def __init__(self, barrier: "threading.Barrier | None" = None, fail: bool = False) -> None:
        super().__init__()
        self.seen: list = []
        self.barrier = barrier
        self.fail = fail

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        if self.barrier is not None:
            self.barrier.wait()
        if self.fail and x.shape[0] == 1:
            raise KeyError("the small slice fails")
        return x * 2


def _in_a_new_thread(function):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


@pytest.fixture
def four_intra_op_threads():
    """A pool of 4 whatever the machine has, so the shares below are the same everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def assert_four_threads_again():
    """Back in the caller, and in threads started afterwards (the process-wide value)."""
    assert torch.get_num_threads() == 4
    assert _in_a_new_thread(torch.get_num_threads) == 4


@openmp_only
@pytest.mark.parametrize("replicas,share", [(2, 2), (4, 1), (8, 1)])
def test_replicas_share_the_intra_op_threads_and_the_count_comes_back(four_intra_op_threads, replicas, share):
    model = CountsThreads()
    EmulatedDataParallel(model, replicas)(torch.ones(replicas, 3, requires_grad=True)).sum().backward()
    assert model.seen == [share] * replicas
    assert_four_threads_again()


@openmp_only
def test_the_thread_count_comes_back_when_a_replica_raises(four_intra_op_threads):
    model = CountsThreads(fail=True)
    with pytest.raises(KeyError, match="the small slice fails"):
        EmulatedDataParallel(model, 4)(torch.ones(10, 1))
    assert model.seen == [1] * 4
    assert_four_threads_again()


@openmp_only
def test_concurrent_emulated_forwards_share_the_threads_and_restore_once_both_end(four_intra_op_threads):
    """The second forward to start shares the pool with the first; callers keep their own count."""
    replicas_meet = threading.Barrier(4, timeout=60)
    callers_meet = threading.Barrier(2, timeout=60)
    models = [CountsThreads(replicas_meet), CountsThreads(replicas_meet)]
    after: dict = {}

    def caller(index: int) -> None:
        torch.get_num_threads()  # a thread that used torch before, as callers do
        callers_meet.wait()
        EmulatedDataParallel(models[index], 2)(torch.ones(4, 3))
        after[index] = torch.get_num_threads()

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    # One forward started alone (4 threads // 2 replicas), the other beside it (4 // 4).
    assert sorted(models[0].seen + models[1].seen) == [1, 1, 2, 2]
    assert after == {0: 4, 1: 4}
    assert_four_threads_again()


def test_a_single_replica_runs_in_the_callers_thread_with_its_whole_pool():
    model = CountsThreads()
    EmulatedDataParallel(model, 4)(torch.ones(1, 3))
    assert model.seen == [torch.get_num_threads()]
