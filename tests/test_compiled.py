"""``torch.compile(fullgraph=True)`` keeps synchronized BatchNorm in one graph (``autosyncbn.compiled``).

Real gloo ranks, each compiling its own model; the oracle is one process
running the whole batch eagerly with plain ``nn.BatchNorm``. The layers here
call ``compiled_batch_norm`` themselves (the dispatch hook is not wired yet).
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import autosyncbn
from autosyncbn.processes import run_ranks

from helpers import assert_close_to_scale, assert_models_match

pytestmark = pytest.mark.timeout(240)


class CompiledSyncBatchNorm(_BatchNorm):
    """A BatchNorm of any input rank whose training calls are ``compiled_batch_norm`` over the world."""

    def __init__(self, channels: int, name: str, **options) -> None:
        super().__init__(channels, **options)
        self.layer_name = name

    def _check_input_dim(self, input):
        pass

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        from autosyncbn.compiled import compiled_batch_norm

        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        running = self.track_running_stats
        return compiled_batch_norm(input, self.running_mean if running else None,
                                   self.running_var if running else None, self.weight, self.bias,
                                   self.momentum, self.eps, dist.group.WORLD, self.layer_name)


def _network(batch_norm) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), batch_norm(4, "1"), nn.Tanh(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), batch_norm(4, "4"))


def _slice(sizes, tensor, rank):
    return torch.split(tensor, list(sizes))[rank]


def _train_and_compare(rank, model, run, reference, steps):
    """Every step: this rank's slice through ``run``, the whole batch through ``reference``; compare."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step, sizes in enumerate(steps):
        generator = torch.Generator().manual_seed(step)
        x_all = (torch.randn(sum(sizes), 3, 5, 4, generator=generator) * 2 + 0.5).requires_grad_()
        target_all = torch.randn(sum(sizes), 4, 5, 4, generator=generator)
        ref_out = reference(x_all)
        ((ref_out * target_all).sum() + (ref_out - target_all).square().sum() / ref_out.numel()).backward()
        x = _slice(sizes, x_all.detach(), rank).clone().requires_grad_()
        target = _slice(sizes, target_all, rank)
        out = run(x)
        ((out * target).sum() + (out - target).square().sum() / ref_out.numel()).backward()
        assert_close_to_scale(out, _slice(sizes, ref_out.detach(), rank), what=f"step {step} output")
        assert_close_to_scale(x.grad, _slice(sizes, x_all.grad, rank), what=f"step {step} input grad")
        for p in model.parameters():  # what DDP does, with a sum instead of a mean
            dist.all_reduce(p.grad)
        assert_models_match(model, reference)
        for optimizer in (opt, ref_opt):
            optimizer.step()
            optimizer.zero_grad()
    assert_models_match(model, reference)


# Uneven slices; then a smaller last batch (a recompile), with an empty slice on rank 1.
_STEPS = [(5, 3), (5, 3), (5, 3), (3, 0)]


def worker_training(rank, world, backends, steps):
    for backend in backends:
        backend = backend[rank] if isinstance(backend, tuple) else backend
        model = _network(CompiledSyncBatchNorm)
        reference = _network(lambda channels, name: nn.BatchNorm2d(channels))
        run = torch.compile(model, fullgraph=True, backend=backend)
        torch._dynamo.utils.counters.clear()
        _train_and_compare(rank, model, run, reference, steps)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs <= len(set(steps)), f"{backend}: {graphs} graphs compiled for {len(set(steps))} batch sizes"
    explained = torch._dynamo.explain(_network(CompiledSyncBatchNorm))(torch.randn(3 + rank, 3, 5, 4))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_ranks_match_one_process_with_the_global_batch():
    """Backends eager and aot_eager (one pair of processes for both: each spawn costs seconds)."""
    run_ranks(worker_training, 2, ("eager", "aot_eager"), _STEPS, deadline=120)


def test_inductor_rank_meets_an_aot_eager_rank():
    """Inductor on rank 0, aot_eager on rank 1: both graphs hold the same operators, so the ranks
    meet. (Inductor's first compile on CI's 2 cores takes ~15 s, most of it building its C++
    headers once; one rank and one batch size keep it at that.)"""
    run_ranks(worker_training, 2, (("inductor", "aot_eager"),), _STEPS[:2], deadline=200, pg_timeout=150)


# -- every input rank, dtype and layout, 3 ranks with an empty slice ---------------------------------
_CASES = [  # (shape after the batch dimension, dtype, channels_last, offset)
    ((3,), torch.float32, False, 0.5),
    ((3, 7), torch.float64, False, 0.5),
    ((3, 4, 5), torch.float32, True, 0.5),
    ((3, 3, 4, 2), torch.float32, False, 0.5),
    ((3, 4, 5), torch.float16, False, 0.5),
    ((3, 4, 5), torch.float32, False, 3e4),  # a large mean and a small spread
]


def worker_cases(rank, world, sizes):
    for index, (shape, dtype, channels_last, offset) in enumerate(_CASES):
        generator = torch.Generator().manual_seed(index)
        x_all = (torch.randn(sum(sizes), *shape, generator=generator, dtype=torch.float64) + offset).to(dtype)
        grad_all = torch.randn(x_all.shape, generator=generator).to(dtype)
        parameters = torch.float64 if dtype == torch.float64 else torch.float32
        layer = CompiledSyncBatchNorm(shape[0], f"case {index}", dtype=parameters)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=generator)
            layer.bias.uniform_(-1, 1, generator=generator)
        reference = copy.deepcopy(layer).double()  # the oracle in float64: exact to the test's eyes
        x_ref = x_all.detach().double().requires_grad_()
        expected = F.batch_norm(x_ref, reference.running_mean, reference.running_var, reference.weight,
                                reference.bias, True, 0.1, reference.eps)
        expected.backward(grad_all.double())
        x = _slice(sizes, x_all, rank).clone()
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        out = torch.compile(layer, fullgraph=True, backend="eager")(x)
        out.backward(_slice(sizes, grad_all, rank))
        what = f"case {index} on rank {rank}"
        assert out.dtype == dtype and out.shape == x.shape, what
        for p in layer.parameters():
            dist.all_reduce(p.grad)
        pairs = [("output", out, _slice(sizes, expected.detach(), rank), 1.0),
                 ("input grad", x.grad, _slice(sizes, x_ref.grad, rank), 1.0),
                 *[(f"grad of {name}", p.grad, q.grad, q.grad.abs().max().item())
                   for (name, p), q in zip(layer.named_parameters(), reference.parameters())],
                 ("running_mean", layer.running_mean, reference.running_mean, max(offset, 1.0)),
                 ("running_var", layer.running_var, reference.running_var, 1.0)]
        for part, actual, wanted, scale in pairs:
            assert actual is not None, f"{what}: no {part}"
            assert_close_to_scale(actual, wanted.to(actual.dtype), 2e-3 if dtype == torch.float16 else 2e-5,
                                  f"{what}: {part}", scale)


def test_every_input_rank_and_dtype_on_three_ranks_with_an_empty_slice():
    run_ranks(worker_cases, 3, (4, 0, 3), deadline=120)


# -- errors on every rank, never a hang -------------------------------------------------------------
class _TwoLayers(nn.Module):
    def __init__(self, swapped: bool) -> None:
        super().__init__()
        self.a, self.b = CompiledSyncBatchNorm(4, "a"), CompiledSyncBatchNorm(4, "b")
        self.swapped = swapped

    def forward(self, x):
        return self.a(self.b(x)) if self.swapped else self.b(self.a(x))


def worker_errors(rank, world):
    model = _TwoLayers(swapped=rank == 1)
    run = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(autosyncbn.ReplicaMismatchError) as info:
        run(torch.randn(3, 4))
    message = str(info.value)
    assert "rank 0" in message and "rank 1" in message and "'a'" in message and "'b'" in message, message
    model.swapped = False  # every rank in the same order again: the ranks are back in step
    run(torch.randn(3, 4)).sum().backward()
    one = torch.compile(CompiledSyncBatchNorm(4, "one"), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        one(torch.randn(1 - rank, 4))  # one value per channel over the whole batch
    # The operators' fake implementations and autograd registrations (both ranks call alike).
    local = torch.randn(2, 4, dtype=torch.float64).abs()
    # (Not test_aot_dispatch_*: they compare two calls' outputs, and each call has its own number.)
    torch.library.opcheck(torch.ops.autosyncbn.sync_moments.default, (local, 3, dist.group.WORLD.group_name, "check"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    return True


def test_disagreeing_ranks_raise_in_compiled_graphs():
    run_ranks(worker_errors, 2, deadline=120)


def test_import_registers_no_operator():
    code = ("import sys, torch, autosyncbn; assert 'autosyncbn.compiled' not in sys.modules; "
            "assert not hasattr(torch.ops.autosyncbn, 'sync_moments')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
