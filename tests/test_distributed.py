"""Synchronization over torch.distributed with real processes (gloo on loopback).

Each rank compares its results with one process running the whole global
batch with plain BatchNorm: forward, input gradient, parameter gradients
(summed over ranks) and running statistics, over several steps.
"""
from __future__ import annotations

import contextlib
import copy
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import autosyncbn

from distributed_helpers import run_ranks
from helpers import ConvBlock, assert_close_to_scale, assert_models_match, input_of_rank, loss_of

pytestmark = pytest.mark.timeout(180)


def _global_inputs(steps: int, batch: int, input_rank: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [input_of_rank(input_rank, batch, generator=generator) for _ in range(steps)]


def _slice(sizes, tensor, rank):
    return torch.split(tensor, list(sizes))[rank]


def _checkpointed(module):
    """``module`` run under non-reentrant torch.utils.checkpoint (PyTorch's recommended mode)."""
    return lambda x: torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)


def worker_matches_global_batch(rank, world, sizes, route, input_rank):
    torch.manual_seed(0)
    base = ConvBlock(input_rank, momentum=None if route == "install" else 0.1)
    reference = copy.deepcopy(base)
    model = autosyncbn.convert_model(base) if route in ("explicit", "checkpoint") else base
    run, run_reference = model, reference
    if route == "checkpoint":  # the same on both sides: a recompute updates running statistics again
        run, run_reference = _checkpointed(model), _checkpointed(reference)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step, x_all in enumerate(_global_inputs(3, sum(sizes), input_rank)):
        x_all.requires_grad_()
        ref_out = run_reference(x_all)  # outside the patch: one process, plain BatchNorm
        target_all = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(100 + step))
        loss_of(ref_out, target_all).backward()
        x = _slice(sizes, x_all.detach(), rank).clone().requires_grad_()
        target = _slice(sizes, target_all, rank)
        with autosyncbn.patched(distributed=True) if route == "install" else contextlib.nullcontext():
            out = run(x)
            # This rank's share of loss_of over the global batch.
            ((out * target).sum() + (out - target).square().sum() / ref_out.numel()).backward()
        assert_close_to_scale(out, _slice(sizes, ref_out.detach(), rank), what=f"rank {rank} output")
        assert_close_to_scale(x.grad, _slice(sizes, x_all.grad, rank), what=f"rank {rank} input grad")
        for p in model.parameters():  # what DDP does, with a sum instead of a mean
            dist.all_reduce(p.grad)
        assert_models_match(model, reference)
        opt.step(); ref_opt.step(); opt.zero_grad(); ref_opt.zero_grad()
    assert_models_match(model, reference)


@pytest.mark.parametrize("route", ["explicit", "install"])
@pytest.mark.parametrize("sizes", [(4, 4), (5, 2), (3, 1, 2)], ids=str)
def test_ranks_match_one_process_with_the_global_batch(route, sizes):
    run_ranks(worker_matches_global_batch, len(sizes), sizes, route, 4)


@pytest.mark.parametrize("input_rank", [2, 3, 5])
def test_every_input_rank(input_rank):
    run_ranks(worker_matches_global_batch, 2, (3, 4), "explicit", input_rank)


def test_non_reentrant_checkpoint_equals_one_process():
    # Issue 17, item 6: the layer call is one autograd node saving its input once, so
    # checkpoint's recompute in backward (which meets the other ranks again) unpacks it once.
    run_ranks(worker_matches_global_batch, 2, (3, 4), "checkpoint", 4)


def test_a_rank_with_an_empty_batch():
    run_ranks(worker_matches_global_batch, 3, (4, 0, 3), "explicit", 4)


def worker_ddp_loop(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    reference = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(autosyncbn.convert_model(model))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        x_all = torch.randn(8, 3, 5, 5, generator=generator) * 2 + 1
        t_all = torch.randn(8, 4, 5, 5, generator=generator)
        ref_loss = ((reference(x_all) - t_all) ** 2).mean()
        ref_opt.zero_grad(); ref_loss.backward(); ref_opt.step()
        x, t = x_all.chunk(world)[rank], t_all.chunk(world)[rank]
        loss = ((ddp(x) - t) ** 2).mean()  # DDP averages: the mean over the global batch
        opt.zero_grad(); loss.backward(); opt.step()
    assert_models_match(ddp.module, reference, rel=1e-4)


def test_distributed_data_parallel_training_matches_one_process():
    run_ranks(worker_ddp_loop, 2)


def worker_subgroups(rank, world):
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    torch.manual_seed(0)
    layer = nn.BatchNorm1d(3)
    reference = copy.deepcopy(layer)
    model = autosyncbn.convert_model(nn.Sequential(layer), process_group=mine)
    x_all = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(2)) + torch.arange(4.0).view(4, 1, 1) * 5
    pair = x_all[(rank // 2) * 2: (rank // 2) * 2 + 2].reshape(8, 3)  # this subgroup's batch
    out = model(x_all[rank])
    expected = reference(pair)[(rank % 2) * 4: (rank % 2) * 4 + 4]
    assert_close_to_scale(out, expected.detach(), what=f"rank {rank}")
    assert_close_to_scale(model[0].running_mean, reference.running_mean, what="running_mean")


def test_process_subgroups_synchronize_within_the_group():
    run_ranks(worker_subgroups, 4)


def worker_disagreeing(rank, world, kind):
    a, b, wide = (autosyncbn.SynchronizedBatchNorm1d(4), autosyncbn.SynchronizedBatchNorm1d(4),
                  autosyncbn.SynchronizedBatchNorm1d(6))
    model = nn.ModuleDict(dict(a=a, b=b, wide=wide))
    autosyncbn.convert_model(model)  # records the layers' names
    x = torch.randn(5, 4)
    with pytest.raises(autosyncbn.ReplicaMismatchError) as info:
        if kind == "order":
            (b(a(x)) if rank == 0 else a(b(x)))
        else:
            (a(x) if rank == 0 else wide(torch.randn(5, 6)))
    message = str(info.value)
    assert "rank 0" in message and "rank 1" in message, message
    assert ("'a'" in message and "'b'" in message) if kind == "order" else ("6 channels" in message and "4 channels" in message)
    # Ranks stay in step: the next forward works.
    assert b(a(x)).shape == (5, 4)


@pytest.mark.parametrize("kind", ["order", "channels"])
def test_disagreeing_ranks_raise_the_same_clear_error(kind):
    run_ranks(worker_disagreeing, 2, kind)


def worker_one_value(rank, world):
    layer = autosyncbn.SynchronizedBatchNorm1d(3)
    x = torch.randn(1, 3) if rank == 0 else torch.randn(0, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(x)


def test_global_batch_of_one_value_per_channel_raises_on_every_rank():
    run_ranks(worker_one_value, 2)


def worker_plain_layers_stay_local_without_option(rank, world):
    layer = nn.BatchNorm1d(3)
    x = torch.randn(4, 3) + rank * 10
    with autosyncbn.patched():  # distributed=False: plain layers are PyTorch's own
        out = layer(x)
    torch.testing.assert_close(out, nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True))


def test_install_without_distributed_leaves_process_groups_alone():
    run_ranks(worker_plain_layers_stay_local_without_option, 2)


def test_sync_batchnorm_interop_keeps_state_dicts():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model(torch.randn(4, 3, 2, 2))
    state = copy.deepcopy(model.state_dict())
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(autosyncbn.convert_model(copy.deepcopy(model)))
    assert isinstance(torch_sync[1], nn.SyncBatchNorm)
    ours = autosyncbn.convert_model(torch_sync)
    assert type(ours[1]) is autosyncbn.SynchronizedBatchNorm
    plain = autosyncbn.revert_model(copy.deepcopy(torch_sync))
    for converted in (torch_sync, ours, plain):
        assert converted.state_dict().keys() == state.keys()
        for key, value in converted.state_dict().items():
            assert torch.equal(value, state[key]), key


def worker_nccl(rank, world):
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    base = ConvBlock(4).to(device)
    reference = copy.deepcopy(base)
    model = autosyncbn.convert_model(base)
    for step, x_all in enumerate(_global_inputs(2, 8, 4)):
        x_all = x_all.to(device).requires_grad_()
        ref_out = reference(x_all)
        target_all = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(step)).to(device)
        loss_of(ref_out, target_all).backward()
        x = x_all.detach().chunk(world)[rank].clone().requires_grad_()
        target = target_all.chunk(world)[rank]
        out = model(x)
        ((out * target).sum() + (out - target).square().sum() / ref_out.numel()).backward()
        assert_close_to_scale(out, ref_out.detach().chunk(world)[rank], 1e-4, "output")
        assert_close_to_scale(x.grad, x_all.grad.chunk(world)[rank], 1e-4, "input grad")
        for p in model.parameters():
            dist.all_reduce(p.grad)
        assert_models_match(model, reference, rel=1e-4)
        model.zero_grad()
        reference.zero_grad()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL needs two CUDA devices")
def test_nccl_ranks_match_one_process():
    run_ranks(worker_nccl, 2, backend="nccl")


# -- coverage and hardening across processes ------------------------------------------
def worker_subclass_and_compile(rank, world):
    from test_coverage import BatchNormAct2d

    torch.manual_seed(0)
    x_all = torch.randn(8, 3, 5, 5) * 2 + 1
    x = x_all.chunk(world)[rank]

    # A subclass with its own forward (timm's BatchNormAct2d shape) under install(distributed=True).
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4))
    reference = copy.deepcopy(model)
    with autosyncbn.patched(distributed=True):
        out = model(x)
    assert_close_to_scale(out, reference(x_all).chunk(world)[rank].detach(), what="BatchNormAct2d over gloo")
    assert_close_to_scale(model[1].running_var, reference[1].running_var, what="running_var")

    # Compiled (fullgraph: no graph break), converted or plain under install(distributed=True).
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    reference = copy.deepcopy(model)
    expected = reference(x_all).chunk(world)[rank].detach()
    compiled = torch.compile(autosyncbn.convert_model(copy.deepcopy(model)), backend="eager", fullgraph=True)
    assert_close_to_scale(compiled(x), expected, what="compiled, converted")
    torch._dynamo.reset()
    with autosyncbn.patched(distributed=True):
        out = torch.compile(copy.deepcopy(model), backend="eager", fullgraph=True)(x)
    assert_close_to_scale(out, expected, what="compiled, plain, install(distributed=True)")

    # DataParallel inside a process group cannot synchronize both ways: a clear error.
    from autosyncbn.testing import EmulatedDataParallel

    with autosyncbn.patched(distributed=True), pytest.raises(Exception, match="not both at once"):
        EmulatedDataParallel(copy.deepcopy(reference), 2)(x)
    # Eval mode with batch statistics stays local, as nn.SyncBatchNorm: rank 0 may evaluate alone.
    lone = autosyncbn.convert_model(nn.Sequential(nn.SyncBatchNorm(4, track_running_stats=False))).eval()
    if rank == 0:
        lone(torch.randn(6, 4, 3, 3))
    dist.barrier()


def test_subclass_and_compile_over_a_process_group():
    run_ranks(worker_subclass_and_compile, 2, deadline=150)


def worker_second_backward(rank, world, route):
    """A gradient penalty across processes: the first-order gradient is one process's, a backward
    through it raises (its cross-rank terms would be missing), on every rank alike."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model = autosyncbn.convert_model(copy.deepcopy(plain)) if route == "explicit" else copy.deepcopy(plain)
    x_all, target_all = torch.randn(6, 3, 5, 5), torch.randn(6, 4, 3, 3)
    x_ref = x_all.clone().requires_grad_()
    out = plain(x_ref)
    expected, = torch.autograd.grad((out * target_all).sum() + out.pow(3).sum(), x_ref)
    x = x_all.chunk(world)[rank].clone().requires_grad_()
    with autosyncbn.patched(distributed=True) if route == "install" else contextlib.nullcontext():
        out = model(x)
        grad, = torch.autograd.grad((out * target_all.chunk(world)[rank]).sum() + out.pow(3).sum(), x,
                                    create_graph=True)
    assert_close_to_scale(grad, expected.chunk(world)[rank], what="first-order gradient")
    with pytest.raises(autosyncbn.SyncBatchNormError, match="second backward"):
        grad.square().sum().backward()


@pytest.mark.parametrize("route", ["explicit", "install"])
def test_a_second_backward_across_processes_raises_instead_of_missing_terms(route):
    run_ranks(worker_second_backward, 2, route)


def worker_skipped_backward(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    x = torch.randn(6, 3)
    with autosyncbn.patched(distributed=True):
        model(x).sum().backward()  # in step
        loss = model(x).sum()
        with pytest.raises(autosyncbn.ReplicaMismatchError) as info:
            if rank == 0:  # "loss is NaN, skip the step": rank 0 skips this backward
                model(x)
            else:
                loss.backward()
    message = str(info.value)
    assert "skipped a backward" in message, message
    assert "rank 0: forward" in message and "rank 1: backward" in message, message
    assert "'1'" in message or "'3'" in message, message  # layers named in words, no hashes
    assert "#" not in message, message
    assert "Ranks realign: rank 1, one step behind" in message, message


def test_a_rank_that_skips_a_backward_gets_a_clear_error_not_an_abort():
    run_ranks(worker_skipped_backward, 2)  # and the ranks leave together: a barrier works after it


def _apply_batchnorm_in_a_worker(index):
    layer = nn.BatchNorm1d(3)
    x = torch.randn(4, 3) + index
    return layer(x).sum().item(), torch.distributed.is_initialized()


def worker_dataloader_fork(rank, world):
    start = time.monotonic()
    with autosyncbn.patched(distributed=True):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.arange(4.0)), batch_size=1, num_workers=2,
            multiprocessing_context="fork",
            collate_fn=lambda batch: _apply_batchnorm_in_a_worker(int(batch[0][0])),
        )
        results = list(loader)
    assert len(results) == 4 and all(abs(total) < 1e-4 for total, _ in results), results
    assert time.monotonic() - start < 20


def test_dataloader_fork_workers_never_use_the_parents_process_group():
    run_ranks(worker_dataloader_fork, 2, deadline=60)


# -- recovery: ranks realign after a step out of step ------------------------------------
def _wide_model():
    """One layer wider than the 512 channels of the first record: its second collective runs too."""
    return nn.Sequential(nn.Linear(3, 520), nn.BatchNorm1d(520), nn.Tanh(), nn.Linear(520, 4), nn.BatchNorm1d(4))


def worker_recovers(rank, world, kind, odd_rank, k):
    """``odd_rank`` makes no backward at step ``k`` ("loss is NaN, skip" or a forward under no_grad).

    Expected: step k fails on the ranks that ran a backward (their gradient lacks
    the odd rank's share), step k + 1 fails on every rank, changing nothing, and
    every later step matches one process with the whole batch; a barrier returns.
    """
    steps, sizes = 6, (4, 3, 5)[:world]
    torch.manual_seed(0)
    base = _wide_model()
    reference = copy.deepcopy(base)
    model = autosyncbn.convert_model(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(3)
    outcomes, messages = [], {}
    for step in range(steps):
        x_all = torch.randn(sum(sizes), 3, generator=generator) * 2 + 1
        target_all = torch.randn(sum(sizes), 4, generator=generator)
        x_all.requires_grad_()
        ref_out = None
        if step == k:  # the step every rank ran forward but not every rank backward: statistics only
            with torch.no_grad():
                reference(x_all)
        elif step == k + 1:  # fails on every rank at the first layer, which (as nn.BatchNorm) counted the batch
            reference[1].num_batches_tracked += 1
        else:
            ref_out = reference(x_all)
            loss_of(ref_out, target_all).backward()
        x = _slice(sizes, x_all.detach(), rank).clone().requires_grad_()
        target = _slice(sizes, target_all, rank)
        try:
            if kind == "no_grad" and rank == odd_rank and step == k:
                with torch.no_grad():  # a training-mode forward: synchronized, but no backward follows
                    model(x)
                outcomes.append("forward only")
                continue
            out = model(x)
            if kind == "skip" and rank == odd_rank and step == k:
                outcomes.append("skipped")  # "loss is NaN, skip the step"
                continue
            ((out * target).sum() + (out - target).square().sum() / x_all.shape[0] / 4).backward()
        except autosyncbn.ReplicaMismatchError as error:
            outcomes.append("mismatch")
            messages[step] = str(error)
            opt.zero_grad()  # a backward that failed half-way leaves partial gradients
            assert_models_match(model, reference)  # and changes no parameter or running statistic
            continue
        outcomes.append("synchronized")
        assert ref_out is not None, f"rank {rank}: step {step} synchronized, expected a mismatch"
        assert_close_to_scale(out, _slice(sizes, ref_out.detach(), rank), what=f"rank {rank} step {step} output")
        assert_close_to_scale(x.grad, _slice(sizes, x_all.grad, rank), what=f"rank {rank} step {step} input grad")
        for p in model.parameters():
            dist.all_reduce(p.grad)
        assert_models_match(model, reference)
        opt.step(); ref_opt.step(); opt.zero_grad(); ref_opt.zero_grad()
    expected = ["synchronized"] * steps
    expected[k] = ({"skip": "skipped", "no_grad": "forward only"}[kind] if rank == odd_rank else "mismatch")
    expected[k + 1] = "mismatch"
    assert outcomes == expected, (rank, outcomes, messages)
    if rank == odd_rank:
        assert f"rank {odd_rank}: forward" in messages[k + 1] and "realign" in messages[k + 1], messages
    else:
        assert "backward of call" in messages[k] and "Ranks realign" in messages[k], messages
        dropped = messages[k + 1]  # raised at once, without a collective: this rank was a step behind
        assert "did not synchronize" in dropped and f"while rank {odd_rank} was already in a forward" in dropped, dropped
    assert_models_match(model, reference)
    start = time.monotonic()
    dist.barrier()  # no rank is left inside a collective the others never enter
    assert time.monotonic() - start < 10
    return outcomes


@pytest.mark.parametrize("kind, world, odd_rank, k", [
    ("skip", 2, 1, 2),
    ("skip", 3, 0, 1),
    ("no_grad", 2, 0, 2),
], ids=["rank1-skips-backward", "3-ranks-rank0-skips-backward", "rank0-forward-under-no_grad"])
def test_ranks_realign_after_a_rank_makes_no_backward(kind, world, odd_rank, k):
    outcomes = run_ranks(worker_recovers, world, kind, odd_rank, k, deadline=150, pg_timeout=20)
    assert all(outcome is not None for outcome in outcomes), outcomes


def worker_disagreement_then_training(rank, world):
    """A disagreement in forward (different layers): every rank raises once, then steps match again."""
    torch.manual_seed(0)
    base = _wide_model()
    reference = copy.deepcopy(base)
    model = autosyncbn.convert_model(base)
    other = autosyncbn.SynchronizedBatchNorm1d(4)
    autosyncbn.convert_model(nn.ModuleDict(dict(model=model, other=other)))  # names the layers
    generator = torch.Generator().manual_seed(4)
    with pytest.raises(autosyncbn.ReplicaMismatchError, match="the next calls synchronize again"):
        model(torch.randn(3, 3)) if rank == 0 else other(torch.randn(3, 4))
    if rank == 0:  # as nn.BatchNorm, the layer that raised had counted the batch
        reference[1].num_batches_tracked += 1
    for _ in range(2):
        x_all = torch.randn(6, 3, generator=generator).requires_grad_()
        ref_out = reference(x_all)
        ref_out.square().sum().backward()
        x = x_all.detach().chunk(world)[rank].clone().requires_grad_()
        out = model(x)
        out.square().sum().backward()
        assert_close_to_scale(out, ref_out.detach().chunk(world)[rank], what=f"rank {rank} output")
        assert_close_to_scale(x.grad, x_all.grad.chunk(world)[rank], what=f"rank {rank} input grad")
        for p in model.parameters():
            dist.all_reduce(p.grad)
        assert_models_match(model, reference)
        model.zero_grad(); reference.zero_grad()
    dist.barrier()


def test_ranks_realign_after_a_disagreement_in_forward():
    run_ranks(worker_disagreement_then_training, 2, deadline=120, pg_timeout=20)


# -- issue 24: a rank that raises inside a forward, re-initialized groups, users' inputs ----------------
class RaisesBetweenLayers(nn.Module):
    """Three BatchNorm layers; ``fail_once`` makes the forward raise between the first and the second."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fail_once = False

    def forward(self, x):
        x = self.bn1(self.c1(x))
        if self.fail_once:
            self.fail_once = False
            raise torch.OutOfMemoryError("simulated out of memory between two BatchNorm layers")
        return self.bn3(self.c3(torch.relu(self.bn2(self.c2(x)))))


def worker_raises_between_layers(rank, world, failing_rank, route):
    torch.manual_seed(0)
    model = RaisesBetweenLayers()
    reference = copy.deepcopy(model)
    if route == "explicit":
        model = autosyncbn.convert_model(model)
    else:
        autosyncbn.install(distributed=True)
    outcomes = []
    try:
        for step in range(5):
            x_all = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(step)) * 2 + 1
            model.fail_once = rank == failing_rank and step == 1
            x = x_all[4 * rank:4 * (rank + 1)].clone().requires_grad_()
            try:
                out = model(x)
                out.square().mean().backward()
            except (torch.OutOfMemoryError, autosyncbn.ReplicaMismatchError) as error:
                outcomes.append(type(error).__name__)
                continue
            ref_out = reference(x_all)[4 * rank:4 * (rank + 1)]
            assert_close_to_scale(out, ref_out.detach(), what=f"rank {rank} step {step}")
            outcomes.append("ok")
            model.zero_grad(); reference.zero_grad()
    finally:
        autosyncbn.uninstall()
    return outcomes


@pytest.mark.parametrize("route", ["install", "explicit"])
def test_a_rank_that_raises_between_layers_loses_only_that_step(route):
    outcomes = run_ranks(worker_raises_between_layers, 2, 1, route, deadline=120, pg_timeout=20)
    # The failing rank loses its failing step; its peer loses that step too, and nothing else.
    assert outcomes[1] == ["ok", "OutOfMemoryError", "ok", "ok", "ok"]
    assert outcomes[0] == ["ok", "ReplicaMismatchError", "ok", "ok", "ok"]


def worker_reinitialized_group(rank, world, init_file):
    import datetime

    layer = autosyncbn.SynchronizedBatchNorm1d(3)
    first = layer(torch.randn(4, 3, generator=torch.Generator().manual_seed(rank)))
    dist.destroy_process_group()
    if rank == 1:  # this rank alone makes calls that the new group must not inherit
        for _ in range(3):
            layer(torch.randn(4, 3))
    dist.init_process_group("gloo", init_method=f"file://{init_file}.second", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    x_all = torch.randn(8, 3, generator=torch.Generator().manual_seed(7))
    out = layer(x_all[4 * rank:4 * (rank + 1)])
    reference = nn.BatchNorm1d(3)
    assert_close_to_scale(out, reference(x_all)[4 * rank:4 * (rank + 1)].detach())
    return first.shape[0]


def test_a_destroyed_and_reinitialized_process_group_starts_afresh(tmp_path):
    assert run_ranks(worker_reinitialized_group, 2, str(tmp_path / "rendezvous"), deadline=120,
                     pg_timeout=20) == [4, 4]


def worker_data_parallel_in_a_process_group_warns_nothing_false(rank, world):
    import warnings

    from autosyncbn.testing import EmulatedDataParallel

    autosyncbn.install(distributed=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(autosyncbn.SyncBatchNormError, match="both at once"):
                EmulatedDataParallel(ConvBlock(4), 2)(input_of_rank(4, 4))
        return [str(w.message) for w in caught if issubclass(w.category, autosyncbn.UnsynchronizedBatchNormWarning)]
    finally:
        autosyncbn.uninstall()


def test_the_data_parallel_in_a_process_group_error_comes_without_a_false_warning():
    assert run_ranks(worker_data_parallel_in_a_process_group_warns_nothing_false, 2) == [[], []]


def worker_users_inputs(rank, world):
    from test_users_code import MetaTensor

    torch.manual_seed(0)
    model = autosyncbn.convert_model(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    reference = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    reference.load_state_dict(model.state_dict())
    x_all = torch.randn(6, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    part = x_all[3 * rank:3 * (rank + 1)]
    out = model(MetaTensor(part.clone(), {"rank": rank}))
    assert isinstance(out, MetaTensor) and out.meta == {"rank": rank}
    assert_close_to_scale(out.as_subclass(torch.Tensor), reference(x_all)[3 * rank:3 * (rank + 1)].detach())
    empty = torch.randn(3 if rank == 0 else 0, 3, 0, 2, requires_grad=True)  # no positions anywhere
    model[1](empty).sum().backward()  # the BatchNorm alone (a convolution refuses an empty image)
    assert empty.grad.shape == empty.shape
    return True


def test_tensor_subclasses_and_empty_batches_over_processes():
    assert run_ranks(worker_users_inputs, 2) == [True, True]
