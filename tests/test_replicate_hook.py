"""Replicas register at replicate: whoever runs them, they synchronize (issue 17).

Every numeric check compares with the same model on one device with the whole
batch and plain BatchNorm.
"""
from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel, EmulatedDataParallelWithCallback, cpu_replicate

from helpers import OwnThreads, ConvBlock, assert_close_to_scale, assert_models_match, input_of_rank, train_side_by_side

pytestmark = pytest.mark.timeout(60)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's shape: a _BatchNorm subclass with a forward of its own that calls F.batch_norm."""

    def forward(self, x):
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor,
                         self.eps)
        return torch.relu(x)


class ConditionalBatchNorm(nn.Module):
    """BigGAN's shape: F.batch_norm on buffers of its own, with a per-class gain."""

    def __init__(self, channels: int, classes: int = 3) -> None:
        super().__init__()
        self.register_buffer("stored_mean", torch.zeros(channels))
        self.register_buffer("stored_var", torch.ones(channels))
        self.gain = nn.Embedding(classes, channels)
        nn.init.normal_(self.gain.weight, 1.0, 0.1)

    def forward(self, x, y):
        out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, 1e-4)
        return out * self.gain(y)[:, :, None, None]


def _steps(model, runner, replicas=3, steps=3, rank=4):
    torch.manual_seed(0)
    inputs = [input_of_rank(rank, 7).requires_grad_() for _ in range(steps)]
    for step, (out, ref_out, x, x_ref, model, reference) in enumerate(
            train_side_by_side(model, inputs, replicas, runner)):
        assert_close_to_scale(out, ref_out, what=f"output, step {step}")
        assert_close_to_scale(x.grad, x_ref.grad, what=f"input grad, step {step}")
        assert_models_match(model, reference)


# -- item 1: any runner -------------------------------------------------------------------------
def test_install_synchronizes_replicas_that_run_in_threads_of_their_own(installed):
    _steps(ConvBlock(4), OwnThreads)


@pytest.mark.parametrize("through", ["convert_model", "patch_replication_callback"])
def test_the_classic_api_synchronizes_replicas_that_run_in_threads_of_their_own(through):
    # Item 2: a DeepLab-style classic client whose DataParallel runs its replicas itself.
    def wrap(model, replicas):
        parallel = OwnThreads(model, replicas)
        autosyncbn.patch_replication_callback(parallel)
        return parallel

    model = autosyncbn.convert_model(ConvBlock(4))
    runner = wrap if through == "patch_replication_callback" else (
        lambda m, n: type("OwnThreadsWithCallback", (OwnThreads, autosyncbn.DataParallelWithCallback), {})(m, n))
    with warnings.catch_warnings():
        warnings.simplefilter("error", autosyncbn.UnsynchronizedBatchNormWarning)
        _steps(model, runner)


def test_a_user_class_mixing_a_runner_with_data_parallel_with_callback_synchronizes():
    class Mixed(EmulatedDataParallel, autosyncbn.DataParallelWithCallback):
        pass

    _steps(autosyncbn.convert_model(ConvBlock(4)), Mixed)


def test_replicas_run_one_after_another_get_a_clear_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(autosyncbn.group, "START_GRACE_SECONDS", 0.5)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with autosyncbn.patched():
        replicas = cpu_replicate(model, 2)
        autosyncbn.replicas.register(replicas, autosyncbn.replicas.plan_of(autosyncbn.settings.current()))
        with pytest.raises(autosyncbn.SyncBatchNormError, match=r"replicas \[1\] never started.*side by side"):
            replicas[0](torch.randn(4, 3))  # replica 1 would run after this one returns


# -- item 3: copies of a patched DataParallel ---------------------------------------------------
def test_a_deep_copy_of_a_patched_data_parallel_is_driven_by_its_own_patch():
    torch.manual_seed(0)
    original = OwnThreads(autosyncbn.convert_model(ConvBlock(4)), 3)
    autosyncbn.patch_replication_callback(original)
    twin = copy.deepcopy(original)  # an EMA helper's copy
    autosyncbn.patch_replication_callback(original, timeout=30)  # patching the original again
    assert twin.__dict__["replicate"].data_parallel is twin
    reference = copy.deepcopy(twin.module)
    x = input_of_rank(4, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", autosyncbn.UnsynchronizedBatchNormWarning)
        assert_close_to_scale(twin(x), reference(x))
        assert_models_match(twin.module, reference)


# -- item 4: acyclic exception chains ----------------------------------------------------------
class FailsInReplica(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x):
        x = self.a(x)
        if x.shape[0] == 1:  # the last, smallest slice
            raise ValueError("replica-specific failure")
        return self.b(x)


def _chain_length(error: BaseException) -> int:
    seen, todo = set(), [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        todo += [current.__cause__, current.__context__]
    return len(seen)


@pytest.mark.parametrize("runner", [EmulatedDataParallel, OwnThreads], ids=["parallel_apply-like", "own threads"])
def test_exception_chains_have_no_cycle(installed, runner):
    with pytest.raises((ValueError, autosyncbn.PeerFailedError)) as info:
        runner(FailsInReplica(), 3)(torch.randn(5, 3))  # slices 2, 2, 1
    error = info.value
    for _ in range(10):  # a walk that follows every link ends
        error = error.__cause__ or error.__context__
        if error is None:
            break
    assert error is None
    assert _chain_length(info.value) <= 3 and "replica-specific failure" in str(info.value) + str(
        info.value.__cause__ or info.value.__context__)


def test_the_caller_sees_the_failing_replicas_own_error_with_peers_chained_once(installed):
    with pytest.raises(ValueError, match="replica-specific failure") as info:
        EmulatedDataParallel(FailsInReplica(), 3)(torch.randn(5, 3))
    assert isinstance(info.value.__cause__, autosyncbn.PeerFailedError)
    assert info.value.__cause__.__cause__ is None and info.value.__cause__.__context__ is None


# -- item 7: no reference cycles per step --------------------------------------------------------
_GARBAGE_AFTER_A_STEP = """
import gc, sys
import torch
import autosyncbn
sys.path.insert(0, {tests!r})
from helpers import ConvBlock, OwnThreads, input_of_rank
from autosyncbn.testing import EmulatedDataParallel

runner = {{"parallel_apply-like": EmulatedDataParallel, "own threads": OwnThreads}}[{runner!r}]
autosyncbn.install()
parallel = runner(ConvBlock(4), 3)

def step():
    out = parallel(input_of_rank(4, 7).requires_grad_())
    out.square().mean().backward()

step(); step()
gc.collect(); gc.disable(); gc.set_debug(gc.DEBUG_SAVEALL)
step()
found = gc.collect()
print(found, sorted({{type(o).__name__ for o in gc.garbage}}))
"""


@pytest.mark.parametrize("runner", ["parallel_apply-like", "own threads"])
def test_a_synchronized_step_leaves_nothing_for_the_cycle_collector(runner):
    # In a fresh interpreter: other tests' leftovers (torch.compile's caches) are no step's garbage.
    import pathlib
    import subprocess
    import sys

    script = _GARBAGE_AFTER_A_STEP.format(tests=str(pathlib.Path(__file__).parent), runner=runner)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split(" ", 1)[0] == "0", result.stdout


# -- item 9: torch.func transforms ---------------------------------------------------------------
class VmappedBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3, track_running_stats=False)

    def forward(self, x):
        return torch.func.vmap(self.bn, in_dims=1, out_dims=1)(x)  # (N, T, C): T independent batches


def test_vmap_inside_a_replica_names_the_limit_and_the_way_out(installed):
    x = torch.randn(8, 2, 3)
    with pytest.raises(autosyncbn.SyncBatchNormError, match=r"'bn'.*torch.func.*exclude"):
        EmulatedDataParallel(VmappedBatchNorm(), 2)(x)
    model = VmappedBatchNorm()
    autosyncbn.exclude(model.bn)  # the way out: per slice, as the message says
    out = EmulatedDataParallel(model, 2)(x)
    assert torch.allclose(out, torch.cat([model(p) for p in x.chunk(2)]), atol=1e-6)


# -- item 10: the explicit API is never silently per slice --------------------------------------
def test_convert_model_synchronizes_a_batchnorm_subclass_with_its_own_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4), nn.Conv2d(4, 4, 1), BatchNormAct2d(4, momentum=None))
    converted = autosyncbn.convert_model(model)
    assert all(isinstance(m, BatchNormAct2d) for m in (converted[1], converted[3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", autosyncbn.UnsynchronizedBatchNormWarning)
        _steps(converted, EmulatedDataParallelWithCallback, rank=4)
    reverted = autosyncbn.revert_model(converted)
    assert type(reverted[1]) is BatchNormAct2d and reverted[1].weight is model[1].weight


def test_a_converted_subclass_pickles_and_deep_copies():
    converted = autosyncbn.convert_model(nn.Sequential(BatchNormAct2d(4)))
    twin = copy.deepcopy(converted)
    assert type(twin[0]) is type(converted[0]) and twin[0].weight is not converted[0].weight
    import io

    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 4, 2, 2)
    assert torch.equal(loaded.eval()(x), converted.eval()(x))


def test_a_conditional_batchnorm_under_the_explicit_api_warns_and_install_synchronizes_it():
    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.cbn = ConditionalBatchNorm(4)

        def forward(self, x, y):
            return self.cbn(self.conv(x), y)

    model = autosyncbn.convert_model(Generator())
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    with pytest.warns(autosyncbn.UnsynchronizedBatchNormWarning, match=r"'cbn'.*install\(\)"):
        EmulatedDataParallelWithCallback(model, 2)(x, y)
    reference = copy.deepcopy(model)
    with autosyncbn.patched():
        assert_close_to_scale(EmulatedDataParallelWithCallback(model, 2)(x, y), reference(x, y))


# -- issue 18: the explicit classes are PyTorch's BatchNorm -----------------------------------
@pytest.mark.parametrize("cls,plain", [(autosyncbn.SynchronizedBatchNorm1d, nn.BatchNorm1d),
                                       (autosyncbn.SynchronizedBatchNorm2d, nn.BatchNorm2d),
                                       (autosyncbn.SynchronizedBatchNorm3d, nn.BatchNorm3d)])
def test_every_argument_of_the_plain_class_is_accepted(cls, plain):
    import inspect

    arguments = inspect.signature(plain).parameters
    values = {"num_features": 4, "eps": 1e-3, "momentum": None, "affine": True, "track_running_stats": True,
              "device": "cpu", "dtype": torch.float64, "bias": False}
    given = {name: values[name] for name in arguments if name in values}
    assert set(given) == set(arguments) - {"self"}, f"a new argument of {plain.__name__}: test it"
    layer, twin = cls(**given), plain(**given)
    assert layer.extra_repr() == twin.extra_repr()
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    assert cls(4, 1e-3, 0.2, False).momentum == 0.2  # the classic positional order still works


# -- found by review of the new engine ------------------------------------------------------------
@pytest.mark.parametrize("mean,std", [(3e4, 1.0), (100.0, 0.1)])
def test_large_mean_small_spread_loses_no_more_precision_than_one_device(installed, mean, std):
    # Each part's mean is carried in float64 into Chan's merge (its float32 rounding would cost 400x).
    worst_ours = worst_pytorch = 0.0
    for seed in range(5):
        torch.manual_seed(seed)
        x = torch.randn(8, 4, 8, 8, dtype=torch.float64) * std + mean
        exact = x.var((0, 2, 3), unbiased=True)
        one_device, layer = nn.BatchNorm2d(4, momentum=1.0), nn.BatchNorm2d(4, momentum=1.0)
        one_device(x.float())
        EmulatedDataParallel(layer, 4)(x.float())
        worst_pytorch = max(worst_pytorch, ((one_device.running_var.double() - exact).abs() / exact).max().item())
        worst_ours = max(worst_ours, ((layer.running_var.double() - exact).abs() / exact).max().item())
    assert worst_ours <= 2 * worst_pytorch + 1e-7, (worst_ours, worst_pytorch)


@pytest.mark.parametrize("shape", [(6, 3, 50), (7, 5, 3, 3), (32, 8, 4, 4)], ids=str)
@pytest.mark.parametrize("mean,std", [(1e5, 0.01), (1e5, 1.0), (1e4, 0.01), (3.0, 1.0)])
def test_normalized_output_of_a_wide_input_is_as_accurate_as_one_device(installed, shape, mean, std):
    # PyTorch's kernel computes x * a + (bias - mean * a): for a large mean and a small spread the two
    # terms nearly cancel; autosyncbn subtracts the mean first there (issue 24, item 18: was up to 3.3x).
    worst_ours = worst_pytorch = 0.0
    layer = nn.BatchNorm1d if len(shape) == 3 else nn.BatchNorm2d
    for replicas in (2, 3):
        x = (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(replicas)) * std
             + mean).float()
        exact = F.batch_norm(x.double(), None, None, training=True)
        pytorch = layer(shape[1], affine=False)(x)
        ours = EmulatedDataParallel(layer(shape[1], affine=False), replicas)(x)
        worst_pytorch = max(worst_pytorch, (pytorch.double() - exact).abs().max().item())
        worst_ours = max(worst_ours, (ours.double() - exact).abs().max().item())
    assert worst_ours <= 2 * worst_pytorch, (worst_ours, worst_pytorch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_gradient_is_as_accurate_as_one_device(installed, dtype):
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(4)
    x = (torch.randn(8, 4, 6, 6) * 3 + 1).to(dtype)
    grad = torch.randn(8, 4, 6, 6).to(dtype)

    def input_grad(run, x):
        x = x.clone().requires_grad_()
        run(x).backward(grad.to(x.dtype))
        return x.grad.double()

    exact = input_grad(copy.deepcopy(layer).double(), x.double())
    ours = (input_grad(EmulatedDataParallel(copy.deepcopy(layer), 4), x) - exact).abs().max().item()
    pytorch = (input_grad(copy.deepcopy(layer), x) - exact).abs().max().item()
    assert ours <= 1.5 * pytorch, (ours, pytorch)


def test_converted_layers_under_a_plain_data_parallel_warn_that_they_stay_per_slice():
    model = autosyncbn.convert_model(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.warns(autosyncbn.UnsynchronizedBatchNormWarning, match="DataParallelWithCallback"):
        EmulatedDataParallel(model, 2)(torch.randn(8, 3))


def test_convert_model_with_an_uninitialized_lazy_layer():
    model = autosyncbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()))
    model(torch.randn(2, 3, 2, 2))  # the lazy layer becomes the twin of what it would have become
    assert isinstance(model[1], autosyncbn.SynchronizedBatchNorm2d)
    reference = autosyncbn.revert_model(copy.deepcopy(model))
    x = torch.randn(7, 3, 2, 2)
    assert_close_to_scale(EmulatedDataParallelWithCallback(model, 3)(x), reference(x))


def test_a_scripted_submodule_in_a_synchronized_model(installed):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), torch.jit.script(nn.Sequential(nn.Conv2d(4, 4, 1))))
    reference = copy.deepcopy(model)
    x = torch.randn(7, 3, 2, 2)
    assert_close_to_scale(EmulatedDataParallel(model, 3)(x), reference(x))


def test_explicit_classes_show_pytorchs_arguments():
    import inspect

    shown = inspect.signature(autosyncbn.SynchronizedBatchNorm2d).parameters
    assert {"num_features", "eps", "momentum", "affine", "track_running_stats", "bias", "process_group"} <= set(shown)


class SlowReplica(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        if x.shape[0] == 1:  # the last, smallest slice
            import time

            time.sleep(2.0)
        return self.bn(x)


def test_an_explicit_data_parallels_own_timeout_holds_under_install(installed):
    # Under install() the patched replicate registers first; the explicit timeout is still the one used.
    parallel = EmulatedDataParallelWithCallback(autosyncbn.convert_model(SlowReplica()), 3, timeout=0.5)
    with pytest.raises(autosyncbn.SyncTimeoutError, match=r"waited 0.5s"):
        parallel(torch.randn(5, 3))
