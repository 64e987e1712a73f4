"""``torch.compile(fullgraph=True)`` keeps synchronized BatchNorm in one graph, across processes.

Real gloo ranks, each compiling its own model (a converted one, or plain
layers under ``install(distributed=True)``); the oracle is one process running
the whole batch eagerly with plain ``nn.BatchNorm``. ``fullgraph=True``
raises at any graph break, so every compiled run here also says "no graph
break". Each spawn of ranks costs seconds on CI's 2 cores: one worker checks
several things.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import subprocess
import sys
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import autosyncbn
from autosyncbn import compiling
from autosyncbn.processes import run_ranks
from autosyncbn.testing import EmulatedDataParallel

from helpers import assert_close_to_scale, assert_models_match
from test_coverage import BatchNormAct2d

pytestmark = pytest.mark.timeout(300)


def _network() -> nn.Module:
    """Plain BatchNorm2d and a layer shaped like timm's BatchNormAct2d (its own forward calls F.batch_norm)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Tanh(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), BatchNormAct2d(4))


def _prepared(mode: str, model: nn.Module) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """``model`` as a user synchronizes it: converted, or plain under install(distributed=True) (the
    scope to run it in, made anew for each use)."""
    if mode == "convert":
        return autosyncbn.convert_model(model), contextlib.nullcontext
    return model, lambda: autosyncbn.patched(distributed=True)


def _slice(sizes, tensor, rank):
    return torch.split(tensor, list(sizes))[rank]


def _batch(step: int, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return (torch.randn(sum(sizes), 3, 5, 4, generator=generator) * 2 + 0.5,
            torch.randn(sum(sizes), 4, 5, 4, generator=generator))


def _loss(out, target, count):
    return (out * target).sum() + (out - target).square().sum() / count


def _train_and_compare(rank, model, run, reference, steps, scope, gradient_scale=1.0, reduce=True):
    """Every step: this rank's slice through ``run`` (inside ``scope()``), the whole batch through
    ``reference`` (eagerly, outside it); outputs, input and parameter gradients, then running statistics.
    Parameter gradients are summed over the ranks here (``reduce``), or averaged by DDP and scaled back
    (``gradient_scale``: the world size)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step, sizes in enumerate(steps):
        x_all, target_all = _batch(step, sizes)
        x_all.requires_grad_()
        ref_out = reference(x_all)
        _loss(ref_out, target_all, ref_out.numel()).backward()
        x = _slice(sizes, x_all.detach(), rank).clone().requires_grad_()
        with scope():
            out = run(x)
            _loss(out, _slice(sizes, target_all, rank), ref_out.numel()).backward()
        assert_close_to_scale(out, _slice(sizes, ref_out.detach(), rank), what=f"step {step} output")
        assert_close_to_scale(x.grad, _slice(sizes, x_all.grad, rank), what=f"step {step} input grad")
        for p in model.parameters():
            if reduce:  # what DDP does, with a sum instead of a mean
                dist.all_reduce(p.grad)
            p.grad *= gradient_scale
        assert_models_match(model, reference)
        for optimizer in (opt, ref_opt):
            optimizer.step()
            optimizer.zero_grad()
    assert_models_match(model, reference)


# Uneven slices; then a smaller last batch (a recompile), with an empty slice on rank 1.
_STEPS = [(5, 3), (5, 3), (5, 3), (3, 0)]


def worker_training(rank, world, modes, backends, steps):
    for mode in modes:
        for backend in backends:
            backend = backend[rank] if isinstance(backend, tuple) else backend
            torch._dynamo.reset()
            reference = _network()
            model, scope = _prepared(mode, copy.deepcopy(reference))
            run = torch.compile(model, fullgraph=True, backend=backend)
            torch._dynamo.utils.counters.clear()
            _train_and_compare(rank, model, run, reference, steps, scope)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            sizes = len({sizes[rank] for sizes in steps})
            assert graphs <= sizes, f"{mode}, {backend}: {graphs} graphs compiled for {sizes} batch sizes"
            # Eval mode: running statistics, no collective: rank 0 evaluates alone.
            model.eval()
            reference.eval()
            if rank == 0:
                x = _batch(99, (4,))[0]
                with scope(), torch.no_grad():
                    assert_close_to_scale(run(x), reference(x), what=f"{mode}, {backend}: eval")
            dist.barrier()
        with scope():
            explained = torch._dynamo.explain(model.train())(torch.randn(3 + rank, 3, 5, 4))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_ranks_match_one_process_with_the_global_batch():
    """Converted and installed, with the backends eager and aot_eager (one pair of processes)."""
    run_ranks(worker_training, 2, ("convert", "install"), ("eager", "aot_eager"), _STEPS, deadline=280,
              pg_timeout=120)


def test_inductor_rank_meets_an_aot_eager_rank():
    """Inductor on rank 0, aot_eager on rank 1: both graphs hold the same operators, so the ranks
    meet. (Inductor's first compile on CI's 2 cores takes ~15 s, most of it building its C++
    headers once; one mode and two batch sizes keep it at that.)"""
    run_ranks(worker_training, 2, ("install",), (("inductor", "aot_eager"),), _STEPS[:2], deadline=280,
              pg_timeout=200)


def worker_mixed(rank, world):
    """Rank 0 compiled, rank 1 eager: what a rank past Dynamo's recompile limit (or with a compile
    stance of its own) does. Both exchange what eager mode exchanges, so the numbers hold."""
    for mode in ("convert", "install"):
        torch._dynamo.reset()
        reference = _network()
        model, scope = _prepared(mode, copy.deepcopy(reference))
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if rank == 0 else model
        _train_and_compare(rank, model, run, reference, _STEPS[:3], scope)


def test_a_compiled_rank_meets_an_eager_rank():
    run_ranks(worker_mixed, 2, deadline=200, pg_timeout=120)


# -- DistributedDataParallel, in both orders --------------------------------------------------------
def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def worker_ddp(rank, world):
    # DDP(compile(model)): the compiled model is one graph; DDP averages the gradients.
    torch._dynamo.reset()
    reference = _network()
    model = autosyncbn.convert_model(copy.deepcopy(reference))
    run = DistributedDataParallel(torch.compile(model, fullgraph=True, backend="aot_eager"))
    _train_and_compare(rank, model, run, reference, _STEPS[:2], contextlib.nullcontext, world, reduce=False)
    # compile(DDP(model)): DDP's own forward breaks the graph (its logger, PyTorch's choice);
    # synchronized layers add no break to those of the same model with plain BatchNorm.
    breaks = {}
    for synchronized in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        reference = _network()
        model, scope = _prepared("install", copy.deepcopy(reference))
        if not synchronized:
            scope = contextlib.nullcontext
        run = torch.compile(DistributedDataParallel(model), backend="aot_eager")
        if synchronized:
            _train_and_compare(rank, model, run, reference, _STEPS[:2], scope, world, reduce=False)
        else:
            run(torch.randn(3, 3, 5, 4)).sum().backward()
        breaks[synchronized] = _graph_breaks()
    assert breaks[True] == breaks[False], breaks


def test_both_orders_with_distributed_data_parallel():
    run_ranks(worker_ddp, 2, deadline=280, pg_timeout=120)


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
        layer = autosyncbn.SynchronizedBatchNorm(shape[0], dtype=parameters)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=generator)
            layer.bias.uniform_(-1, 1, generator=generator)
        reference = copy.deepcopy(layer).double()  # the oracle in float64: exact to the test's eyes
        x_ref = x_all.detach().double().requires_grad_()
        expected = F.batch_norm(x_ref, reference.running_mean, reference.running_var, reference.weight,
                                reference.bias, True, 0.1, reference.eps)
        expected.backward(grad_all.double())
        # PyTorch's own kernel on one device in the case's dtype: its error is the yardstick where
        # float32 itself cannot reach 2e-5 (a mean of 3e4: its rounding alone is 2e-3).
        own = copy.deepcopy(layer)
        x_own = x_all.detach().clone().requires_grad_()
        F.batch_norm(x_own, own.running_mean, own.running_var, own.weight, own.bias, True, 0.1,
                     own.eps).backward(grad_all)
        pytorch = {"output": F.batch_norm(x_all.detach(), None, None, own.weight.detach(), own.bias.detach(),
                                          True, 0.1, own.eps),
                   "input grad": x_own.grad, "grad of weight": own.weight.grad, "grad of bias": own.bias.grad}
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
        pairs = [("output", out, expected.detach(), 1.0),
                 ("input grad", x.grad, x_ref.grad, 1.0),
                 *[(f"grad of {name}", p.grad, q.grad, q.grad.abs().max().item())
                   for (name, p), q in zip(layer.named_parameters(), reference.parameters())],
                 ("running_mean", layer.running_mean, reference.running_mean, max(offset, 1.0)),
                 ("running_var", layer.running_var, reference.running_var, 1.0)]
        base = 2e-3 if dtype == torch.float16 else 2e-5
        for part, actual, wanted, scale in pairs:
            assert actual is not None, f"{what}: no {part}"
            if part in ("output", "input grad"):
                own_error = (pytorch[part].double() - wanted).abs().max().item()
                wanted = _slice(sizes, wanted, rank)
            else:
                own_error = (pytorch[part].double() - wanted).abs().max().item() if part in pytorch else 0.0
            scale = max(scale, wanted.abs().max().item() if wanted.numel() else 1.0)
            assert_close_to_scale(actual, wanted.to(actual.dtype), max(base, 2 * own_error / scale),
                                  f"{what}: {part}", scale)
    # Eval mode without running statistics stays local, as nn.SyncBatchNorm: rank 0 alone.
    lone = autosyncbn.SynchronizedBatchNorm(3, track_running_stats=False).eval()
    if rank == 0:
        x = torch.randn(5, 3, 4)
        out = torch.compile(lone, fullgraph=True, backend="aot_eager")(x)
        assert_close_to_scale(out, F.batch_norm(x, None, None, lone.weight, lone.bias, True), what="eval, local")
    dist.barrier()


def test_every_input_rank_and_dtype_on_three_ranks_with_an_empty_slice():
    run_ranks(worker_cases, 3, (4, 0, 3), deadline=200, pg_timeout=120)


# -- what a compiled graph decides, and when it cannot ------------------------------------------------
class _TwoLayers(nn.Module):
    def __init__(self, swapped: bool) -> None:
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        self.swapped = swapped

    def forward(self, x):
        return self.a(self.b(x)) if self.swapped else self.b(self.a(x))


class _ConditionalBatchNorm(nn.Module):
    """No ``_BatchNorm``: its forward calls F.batch_norm with buffers of its own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, None, None, self.training)


def worker_decisions(rank, world):
    x_all = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))  # the same on every rank
    x = x_all.chunk(world)[rank]
    # Ranks calling their layers in different orders: the same clear error on both, then in step again.
    model = autosyncbn.convert_model(_TwoLayers(swapped=rank == 1))
    run = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(autosyncbn.ReplicaMismatchError) as info:
        run(torch.randn(3, 4))
    message = str(info.value)
    assert "rank 0" in message and "rank 1" in message and "'a'" in message and "'b'" in message, message
    model.swapped = False
    run(torch.randn(3, 4)).sum().backward()
    one = torch.compile(autosyncbn.convert_model(nn.BatchNorm1d(4)), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        one(torch.randn(1 - rank, 4))  # one value per channel over the whole batch

    # The options a graph was compiled under are guarded: a change retraces it.
    torch._dynamo.reset()
    layer = nn.BatchNorm1d(4)
    run = torch.compile(layer, fullgraph=True, backend="aot_eager")
    synchronized = F.batch_norm(x_all, None, None, training=True).chunk(world)[rank]
    local = F.batch_norm(x, None, None, training=True)

    def seen() -> str:
        out = run(x)
        return "synced" if torch.allclose(out, synchronized, atol=1e-5) else (
            "local" if torch.allclose(out, local, atol=1e-5) else "neither")

    outcomes = [seen()]
    autosyncbn.install(distributed=True)
    outcomes.append(seen())
    autosyncbn.exclude(layer)
    outcomes.append(seen())
    autosyncbn.include(layer)
    outcomes.append(seen())
    autosyncbn.install(distributed=True, exclude=lambda name, module: True)
    outcomes.append(seen())
    autosyncbn.uninstall()
    outcomes.append(seen())
    assert outcomes == ["local", "synced", "local", "synced", "local", "local"], outcomes

    # A BatchNorm call autosyncbn cannot place in a graph refuses (no per-slice numbers) ...
    torch._dynamo.reset()
    torch.manual_seed(0)  # the same Linear on every rank
    conditional = nn.Sequential(nn.Linear(4, 4), _ConditionalBatchNorm(4))
    reference = copy.deepcopy(conditional)
    with autosyncbn.patched(distributed=True):
        with pytest.raises(Exception, match="cannot place") as info:
            torch.compile(conditional, fullgraph=True, backend="aot_eager")(x)
        assert "torch.compiler.disable" in str(info.value)
        # ... and synchronizes eagerly behind a graph break, as the message says.
        conditional[1].forward = torch.compiler.disable(conditional[1].forward)
        out = torch.compile(conditional, backend="aot_eager")(x)
    assert_close_to_scale(out, reference(x_all).chunk(world)[rank].detach(), what="disabled, synchronized")

    # The operators' fake implementations and autograd registrations (both ranks call alike).
    torch.manual_seed(1)
    # (Not test_aot_dispatch_*: they compare two calls' outputs, and each call has its own number.)
    torch.library.opcheck(torch.ops.autosyncbn.sync_moments.default,
                          (torch.randn(3, 4, 2), 1e-5, dist.group.WORLD.group_name, "check"),
                          test_utils=("test_schema", "test_faketensor"))
    x = torch.randn(3, 4, 5, requires_grad=True)
    merged = torch.stack([torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5])
    torch.library.opcheck(torch.ops.autosyncbn.normalize.default,
                          (x, torch.rand(4), torch.randn(4), merged, torch.tensor(15.0, dtype=torch.float64),
                           torch.tensor(0), torch.tensor(False), 1e-5, "unused", "check"),
                          test_utils=("test_schema", "test_faketensor"))
    return True


def test_compiled_graphs_route_as_the_options_say_and_refuse_what_they_cannot_hold():
    run_ranks(worker_decisions, 2, deadline=200, pg_timeout=120)


def worker_second_backward(rank, world):
    model = autosyncbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    run = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(3, 3, 5, 5, requires_grad=True)
    grad, = torch.autograd.grad(run(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(autosyncbn.SyncBatchNormError, match="second backward"):
        grad.square().sum().backward()


def test_a_second_backward_through_a_compiled_graph_raises():
    """Backend eager: autosyncbn's own error, as in eager mode. (aot_eager and inductor: PyTorch's
    own error first, "torch.compile with aot_autograd does not currently support double backward".)"""
    run_ranks(worker_second_backward, 2, deadline=120)


# -- DataParallel, one process --------------------------------------------------------------------
def test_a_compiled_data_parallel_runs_its_replicas_eagerly_and_synchronizes():
    """torch.compile(DataParallel(model)): Dynamo runs the replica threads' code eagerly, so the
    replicas synchronize as in eager mode and equal one device."""
    torch.manual_seed(0)
    model = _network()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 5, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with autosyncbn.patched():
        torch._dynamo.reset()
        out = torch.compile(EmulatedDataParallel(model, 2), backend="aot_eager")(x)
        out.square().sum().backward()
    expected = reference(x_ref)
    expected.square().sum().backward()
    assert_close_to_scale(out, expected.detach(), what="output")
    del out  # its graph holds the forward's replicas, which hold the patches
    torch._dynamo.reset()
    gc.collect()
    assert_close_to_scale(x.grad, x_ref.grad, what="input grad")
    assert_models_match(model, reference)


class _RoutesInItsReplica(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = autosyncbn.SynchronizedBatchNorm2d(3)

    def forward(self, x):
        compiling.route_when_compiled(self.bn, False, 0)  # what a compiled replica's trace would ask
        return self.bn(x)


def test_a_compiled_graph_inside_synchronized_replicas_raises_a_clear_error():
    """Dynamo tracing inside DataParallel replicas (nn.DataParallel(torch.compile(model)); PyTorch
    2.13 fails at that itself on emulated replicas) meets a clear error, never per-slice numbers."""
    with autosyncbn.patched(), pytest.raises(autosyncbn.SyncBatchNormError, match="inside DataParallel replicas"):
        EmulatedDataParallel(_RoutesInItsReplica(), 2)(torch.randn(4, 3, 2, 2))


def test_the_mark_is_the_one_torch_compiler_assume_constant_result_sets():
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert {k for k in vars(marked) if "dynamo" in k} == {k for k in vars(compiling.route_when_compiled)
                                                          if "dynamo" in k}


def test_import_registers_no_operator():
    code = ("import sys, torch, autosyncbn; assert 'autosyncbn.compiled' not in sys.modules; "
            "assert not hasattr(torch.ops.autosyncbn, 'sync_moments')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_compiled_graphs_see_every_new_filter_but_not_a_scope_opened_again():
    """settings.ROUTING, which compiled graphs are guarded on: the same options in a new patched()
    scope keep it (no retrace each step); a new exclude filter changes it, even one that Python
    allocates where a freed filter was (an ``id`` may be reused)."""
    from autosyncbn import settings

    scopes = set()
    for _ in range(3):
        with autosyncbn.patched(distributed=True):
            scopes.add(settings.ROUTING)
    assert len(scopes) == 1
    seen = []
    for index in range(6):
        autosyncbn.install(distributed=True, exclude=lambda name, layer, index=index: index % 2 == 0)
        seen.append(settings.ROUTING)
        autosyncbn.uninstall()
        gc.collect()
    assert len(set(seen)) == len(seen)


class _ShiftedBatchNorm(nn.BatchNorm1d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training) + 1


def test_a_forward_replaced_on_its_class_is_the_one_compiled():
    """The forward a compiled plain layer runs (its class's, with autosyncbn's batch_norm) follows
    the class: replaced there, the next trace runs the new one, never a copy of the old."""
    layer = _ShiftedBatchNorm(3)
    x = torch.randn(6, 3)
    plain = F.batch_norm(x, None, None, training=True)
    original = _ShiftedBatchNorm.forward
    try:
        with autosyncbn.patched(distributed=True):  # no process group: PyTorch's numbers
            torch._dynamo.reset()
            assert_close_to_scale(torch.compile(layer, fullgraph=True, backend="eager")(x), plain + 1, what="+1")
            _ShiftedBatchNorm.forward = lambda self, x: original(self, x) + 1
            torch._dynamo.reset()
            assert_close_to_scale(torch.compile(layer, fullgraph=True, backend="eager")(x), plain + 2, what="+2")
    finally:
        _ShiftedBatchNorm.forward = original
        torch._dynamo.reset()


def test_a_global_forward_hook_runs_under_compile():
    """A global module hook (a profiler's, a logger's) still runs for BatchNorm layers compiled under
    install(distributed=True); with no process group the numbers are PyTorch's."""
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(type(module).__name__) if isinstance(module, nn.BatchNorm1d)
        else None)
    try:
        with autosyncbn.patched(distributed=True):
            torch._dynamo.reset()
            out = torch.compile(nn.BatchNorm1d(3), backend="eager")(torch.ones(4, 3) * torch.arange(4.0)[:, None])
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert seen == ["BatchNorm1d"]
    assert_close_to_scale(out, F.batch_norm(torch.ones(4, 3) * torch.arange(4.0)[:, None], None, None,
                                            training=True), what="output")
