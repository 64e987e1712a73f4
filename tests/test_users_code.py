"""Users' kinds of code (issue 24): subclasses, tensor subclasses, checkpointing, empty batches,
copies, other runners. Each case behaves as PyTorch on one device with the whole batch does: the
same numbers, or PyTorch's own error, or (where nothing can synchronize) a warning that names the layer.
"""
from __future__ import annotations

import copy
import gc
import io
import pickle
import sys
import types
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpointing
from helpers import ConvBlock, OwnThreads, assert_close_to_scale, assert_models_match, input_of_rank, loss_of
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel, EmulatedDataParallelWithCallback

pytestmark = pytest.mark.timeout(120)


def _train_step_matches(model: nn.Module, wrap, x: torch.Tensor, replicas: int = 3, scope=None) -> None:
    """One training step of ``wrap(model, replicas)`` equals the same model (a deep copy) on the whole batch."""
    reference = copy.deepcopy(model)
    x_par, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with scope if scope is not None else autosyncbn.patched():
        out = wrap(model, replicas)(x_par)
        target = torch.randn_like(out)
        loss_of(out, target).backward()
    ref_out = reference(x_ref)
    loss_of(ref_out, target).backward()
    assert_close_to_scale(out, ref_out, what="output")
    assert_close_to_scale(x_par.grad, x_ref.grad, what="input grad")
    assert_models_match(model, reference)


# -- 1. a subclass keeps its own forward ---------------------------------------------------------------
class ReluAfter(autosyncbn.SynchronizedBatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


def test_a_subclass_of_a_synchronized_class_keeps_its_forward_on_one_device():
    layer, plain = ReluAfter(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), torch.relu(plain(x)))


def test_a_subclass_of_a_synchronized_class_synchronizes_with_its_forward():
    class PlainReluAfter(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), ReluAfter(4))
    reference = nn.Sequential(nn.Conv2d(3, 4, 1), PlainReluAfter(4))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(7, 3, 3, 3) * 2 + 1
    out = EmulatedDataParallelWithCallback(model, 3)(x)
    torch.testing.assert_close(out, reference(x), atol=2e-5, rtol=0)
    assert_models_match(model, reference)


def test_a_batchnorm_subclass_defined_under_patch_sync_batchnorm_keeps_its_forward():
    with autosyncbn.patch_sync_batchnorm():
        class Scaled(nn.BatchNorm2d):
            def forward(self, x):
                return 2.0 * super().forward(x) + 1.0

        layer = Scaled(3)
    assert isinstance(layer, autosyncbn.SynchronizedBatchNorm2d)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), 2.0 * nn.BatchNorm2d(3)(x) + 1.0)


# -- 2. a converted subclass reads its module's globals live -----------------------------------------
_USER_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn

SCALE = 1.0

def activation(x):
    return x

class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: its own forward calls F.batch_norm."""
    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return activation(x) * SCALE

def set_scale(value):
    global SCALE
    SCALE = value
'''


@pytest.fixture
def user_module():
    module = types.ModuleType("users_model_module")
    exec(compile(_USER_MODULE, "users_model_module.py", "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


def test_a_converted_subclass_sees_its_modules_globals_as_they_change(user_module):
    layer = autosyncbn.convert_model(user_module.BatchNormAct(3))
    assert type(layer) is not user_module.BatchNormAct and isinstance(layer, user_module.BatchNormAct)
    x = torch.randn(4, 3, 2, 2)
    before = layer(x)
    user_module.set_scale(3.0)  # a global write made later, by the module's own code
    torch.testing.assert_close(layer(x), 3.0 * before)
    user_module.activation = torch.relu  # a helper monkeypatched later
    torch.testing.assert_close(layer(x), 3.0 * torch.relu(before))


def test_a_converted_subclass_synchronizes(user_module):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), user_module.BatchNormAct(4))
    reference = copy.deepcopy(model)
    converted = autosyncbn.convert_model(model)
    x = torch.randn(7, 3, 3, 3) * 2 + 1
    out = EmulatedDataParallelWithCallback(converted, 3)(x)
    torch.testing.assert_close(out, reference(x), atol=2e-5, rtol=0)
    assert_models_match(converted, reference)


# -- 3, 7. activation checkpointing inside replicas ---------------------------------------------------
class Checkpointed(nn.Module):
    """A stem, a checkpointed block of two BatchNorm layers, and a head BatchNorm."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None))
        self.head = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.stem(x)
        if self.mode.startswith("sequential"):
            y = checkpointing.checkpoint_sequential(self.block, 2, x, use_reentrant=self.mode.endswith("reentrant"))
        else:
            y = checkpointing.checkpoint(self.block, x, use_reentrant=self.mode == "reentrant")
        return self.head(torch.relu(y) + x)


CHECKPOINT_MODES = ["non-reentrant", "reentrant", "sequential", "sequential reentrant"]


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("api", ["install", "backward after the scope", "explicit", "own threads"])
def test_checkpointing_inside_replicas_equals_one_device_with_the_same_checkpointing(mode, api):
    torch.manual_seed(0)
    model = Checkpointed(mode)
    if api == "explicit":
        model = autosyncbn.convert_model(model)
    reference = copy.deepcopy(model)  # one device, the same checkpointing, plain layers
    x = input_of_rank(4, 7, channels=3)  # slices 3, 3, 1
    x_par, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(7, 4, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", autosyncbn.UnsynchronizedBatchNormWarning)
        for _ in range(2):
            if api == "explicit":
                loss_of(EmulatedDataParallelWithCallback(model, 3)(x_par), target).backward()
            else:
                with autosyncbn.patched():
                    out = (OwnThreads if api == "own threads" else EmulatedDataParallel)(model, 3)(x_par)
                    if api != "backward after the scope":
                        loss_of(out, target).backward()
                if api == "backward after the scope":
                    loss_of(out, target).backward()
                    assert not autosyncbn.is_installed()
            loss_of(reference(x_ref), target).backward()
    assert_close_to_scale(x_par.grad, x_ref.grad, what="input grad")
    assert_models_match(model, reference)  # running statistics updated again by each recompute, as PyTorch


@pytest.mark.parametrize("how", ["one replica", "excluded"])
def test_checkpointing_of_a_layer_that_does_not_synchronize_is_pytorchs(how):
    # The recompute of a call that normalized per slice is PyTorch's own: the same as without autosyncbn.
    model = Checkpointed("non-reentrant")
    if how == "excluded":
        autosyncbn.exclude(model)
    reference = copy.deepcopy(model)
    replicas = 1 if how == "one replica" else 2
    x = input_of_rank(4, 6, channels=3)
    x_par, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with autosyncbn.patched():
        out = EmulatedDataParallel(model, replicas)(x_par)
    out.square().mean().backward()
    ref_out = EmulatedDataParallel(reference, replicas)(x_ref)  # nothing installed: plain DataParallel
    ref_out.square().mean().backward()
    assert_close_to_scale(out, ref_out)
    assert_close_to_scale(x_par.grad, x_ref.grad, what="input grad")
    assert_models_match(model, reference)


def test_a_checkpointed_forward_leaves_nothing_installed_once_its_graph_is_gone():
    with autosyncbn.patched():
        out = EmulatedDataParallel(Checkpointed("non-reentrant"), 2)(input_of_rank(4, 6, channels=3))
    assert autosyncbn.replicas.live_groups() == 1  # its recompute must still find the patches
    out.square().mean().backward()
    del out
    gc.collect()
    assert autosyncbn.replicas.live_groups() == 0


# -- 4, 5. replicas autosyncbn cannot synchronize are reported --------------------------------------
class DeepCopyingDataParallel(EmulatedDataParallel):
    def replicate(self, module, device_ids):
        return [copy.deepcopy(module) for _ in device_ids]


def test_replicas_made_by_a_deep_copy_are_warned_about(installed):
    with pytest.warns(autosyncbn.UnsynchronizedBatchNormWarning, match="not made by torch.nn.parallel.replicate"):
        with autosyncbn.sync_report() as report:
            DeepCopyingDataParallel(ConvBlock(4), 2)(input_of_rank(4, 6))
    assert "bn1" in report.per_slice


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_a_torchscript_model_inside_an_installed_data_parallel_is_warned_about(compile_with, installed):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(6, 3, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model) if compile_with == "script" else torch.jit.trace(model, x)
    with pytest.warns(autosyncbn.UnsynchronizedBatchNormWarning, match="TorchScript"):
        with autosyncbn.sync_report() as report:
            EmulatedDataParallel(scripted, 2)(x)
    assert report.per_slice == {"1": ["TorchScript: cannot synchronize"]}


# -- 8, 15. convert_model takes every BatchNorm subclass, and keeps shared layers shared ------------
class TakesKeywords(nn.BatchNorm2d):
    """detectron2's NaiveSyncBatchNorm shape."""

    def __init__(self, *args, stats_mode: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.stats_mode = stats_mode


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct shape: an nn.SyncBatchNorm subclass with its own forward."""

    def forward(self, x):
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("layer", [TakesKeywords, SyncBatchNormAct], ids=lambda cls: cls.__name__)
def test_convert_model_takes_subclasses_with_keywords_and_sync_batchnorm_subclasses(layer):
    import inspect

    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer(4))
    reference = copy.deepcopy(model)
    converted = autosyncbn.convert_model(model)
    assert isinstance(converted[1], layer) and type(converted[1]) is not layer
    assert "process_group" in inspect.signature(type(converted[1])).parameters
    x = torch.randn(7, 3, 3, 3) * 2 + 1
    torch.testing.assert_close(EmulatedDataParallelWithCallback(converted, 3)(x), reference(x), atol=2e-5, rtol=0)
    assert_models_match(converted, reference)
    assert type(autosyncbn.revert_model(converted)[1]) is layer


def test_a_layer_under_two_names_stays_one_layer():
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted = autosyncbn.convert_model(model)
    assert converted[0] is converted[2]
    reverted = autosyncbn.revert_model(converted)
    assert reverted[0] is reverted[2] and type(reverted[0]) is nn.BatchNorm2d


# -- 9. copies of a patched DataParallel -------------------------------------------------------------
@pytest.mark.parametrize("after", ["installed", "uninstalled"])
def test_a_patched_data_parallel_deep_copies_pickles_and_saves(after):
    autosyncbn.install()
    try:
        dp = nn.DataParallel(autosyncbn.convert_model(ConvBlock(4)))
        autosyncbn.patch_replication_callback(dp)
        if after == "uninstalled":
            autosyncbn.uninstall()
        copied = copy.deepcopy(dp)
        assert copied.replicate.data_parallel is copied
        restored = pickle.loads(pickle.dumps(dp))
        buffer = io.BytesIO()
        torch.save(dp, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        x = input_of_rank(4, 4)
        for other in (copied, restored, loaded):
            torch.testing.assert_close(other.module(x), dp.module(x))
    finally:
        autosyncbn.uninstall()


# -- 10. empty batches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 3, 0, 5), (0, 3, 4, 5)], ids=["no positions", "no samples"])
def test_an_empty_batch_trains_as_on_one_device(shape, installed):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, affine=False))
    reference = copy.deepcopy(model)
    x_par, x_ref = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    parallel = EmulatedDataParallel(model, 2) if shape[0] else OwnThreads(model, 2)
    if not shape[0]:  # DataParallel gives an empty batch to one replica: run both on an empty slice
        parallel.scatter = lambda inputs, kwargs, ids: (((x_par[:0],), (x_par[:0],)), ({}, {}))
        parallel.gather = lambda outputs, device: torch.cat(outputs)
    out = parallel(x_par)
    out.sum().backward()
    ref_out = reference(x_ref)
    ref_out.sum().backward()
    assert out.shape == ref_out.shape and x_par.grad.shape == x_ref.grad.shape
    assert_models_match(model, reference)


# -- 11. tensor subclasses stay what they are ----------------------------------------------------------
class MetaTensor(torch.Tensor):
    """MONAI's MetaTensor shape: a __torch_function__ that carries metadata through every op."""

    @staticmethod
    def __new__(cls, data, meta=None):
        return torch.Tensor._make_subclass(cls, data, data.requires_grad)

    def __init__(self, data, meta=None):
        self.meta = dict(meta or {})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        flat = [item for arg in args for item in (arg if isinstance(arg, (list, tuple)) else [arg])]
        source = next((a for a in flat if isinstance(a, MetaTensor)), None)
        for item in result if isinstance(result, (list, tuple)) else [result]:
            if isinstance(item, MetaTensor) and source is not None:
                item.meta = dict(getattr(source, "meta", {}))
        return result


@pytest.mark.parametrize("api", ["install", "explicit"])
def test_a_tensor_subclass_input_is_synchronized_and_stays_a_subclass(api):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.ReLU(), nn.BatchNorm3d(3))
    reference = copy.deepcopy(block)
    model = autosyncbn.convert_model(block) if api == "explicit" else block
    data = torch.randn(5, 2, 2, 3, 2) * 2 + 1
    x = MetaTensor(data.clone(), {"affine": "eye"}).requires_grad_()
    x_ref = data.clone().requires_grad_()
    with autosyncbn.patched() if api == "install" else _nothing():
        wrap = EmulatedDataParallel if api == "install" else EmulatedDataParallelWithCallback
        out = wrap(model, 2)(x)
    assert isinstance(out, MetaTensor) and out.meta == {"affine": "eye"}
    ref_out = reference(x_ref)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), ref_out, atol=2e-5, rtol=0)
    target = torch.randn_like(ref_out)
    (out.as_subclass(torch.Tensor) * target).sum().backward()
    (ref_out * target).sum().backward()
    assert_close_to_scale(x.grad, x_ref.grad, what="input grad")
    assert_models_match(model, reference)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


# -- 12, 13. F.batch_norm's other arguments and forward-mode AD --------------------------------------
class TensorMomentum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        bn = self.bn
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, torch.tensor(0.3), 1e-5)


def test_momentum_given_as_a_tensor(installed):
    model = TensorMomentum()
    reference = copy.deepcopy(model)
    x = torch.randn(7, 3) * 3 + 2
    torch.testing.assert_close(EmulatedDataParallel(model, 3)(x), reference(x), atol=2e-5, rtol=0)
    assert_models_match(model, reference)


def test_forward_mode_ad_through_a_synchronized_layer_raises_a_clear_error(installed):
    import torch.autograd.forward_ad as fwAD

    model = EmulatedDataParallel(nn.BatchNorm1d(3), 2)
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(6, 3), torch.randn(6, 3))
        with pytest.raises(autosyncbn.SyncBatchNormError, match="forward-mode AD"):
            model(x)


def test_forward_mode_ad_on_one_device_is_pytorchs(installed):
    import torch.autograd.forward_ad as fwAD

    layer, plain = autosyncbn.SynchronizedBatchNorm1d(3), nn.BatchNorm1d(3)
    x, tangent = torch.randn(6, 3), torch.randn(6, 3)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent))).tangent
        theirs = fwAD.unpack_dual(plain(fwAD.make_dual(x, tangent))).tangent
    torch.testing.assert_close(ours, theirs)


# -- 16. a wrapper that normalizes with its child's buffers ------------------------------------------
class BorrowsBuffers(nn.Module):
    """Conditional BatchNorm's shape: F.batch_norm with a child's buffers and its own affine."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, affine=False)
        self.scale = nn.Parameter(torch.ones(3) * 1.5)

    def forward(self, x):
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        return F.batch_norm(x, bn.running_mean, bn.running_var, self.scale, None, True, 0.1, 1e-5)


def test_a_wrapper_using_its_childs_buffers_synchronizes_without_a_warning(installed):
    model = BorrowsBuffers()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3, 2, 2) * 2 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", autosyncbn.UnsynchronizedBatchNormWarning)
        out = EmulatedDataParallel(model, 3)(x)
    torch.testing.assert_close(out, reference(x), atol=2e-5, rtol=0)
    assert_models_match(model, reference)


# -- review: a failure leaves nothing behind -----------------------------------------------------------
class FailsInReplicaOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x):
        x = self.bn1(x)
        if x.device.type == "cpu" and torch.nn.parallel.replicate is not None and self._replica_one():
            raise torch.OutOfMemoryError("simulated out of memory in replica 1")
        return self.bn2(x)

    def _replica_one(self) -> bool:
        seat = self.__dict__.get("_autosyncbn_seat")
        return seat is not None and seat[1] == 1


@pytest.mark.parametrize("runner", [EmulatedDataParallel, OwnThreads], ids=["parallel_apply-like", "own threads"])
def test_a_failed_forward_keeps_no_activation_alive(runner, installed):
    gc.collect()
    gc.disable()
    try:
        x = torch.randn(6, 3, requires_grad=True)
        activation = weakref.ref(x)
        with pytest.raises((torch.OutOfMemoryError, autosyncbn.PeerFailedError)):
            runner(FailsInReplicaOne(), 3)(x)
        del x
        assert activation() is None, "the failed forward's input is still alive (a reference cycle)"
    finally:
        gc.enable()


def test_catch_out_of_memory_and_retry_smaller(installed):
    model = FailsInReplicaOne()
    parallel = EmulatedDataParallel(model, 3)
    with pytest.raises(torch.OutOfMemoryError, match="simulated out of memory"):
        parallel(torch.randn(6, 3))
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3)
    out = EmulatedDataParallel(model, 1)(x)  # the retry, on one replica
    torch.testing.assert_close(out, reference(x))


# -- review: one predicate for the quiet path and decide() ---------------------------------------------
def test_a_call_on_the_quiet_path_is_one_decide_sends_to_pytorch_without_a_warning(installed):
    from autosyncbn import dispatch

    layer = nn.BatchNorm1d(3)
    args = (torch.randn(4, 3), layer.running_mean, layer.running_var, layer.weight, layer.bias, True, 0.1, 1e-5)
    assert dispatch.nothing_to_synchronize()  # main thread, nothing registered, nothing recording
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for owner in (layer, None):
            route = dispatch.decide(dispatch.BatchNormCall(args, owner))
            assert route.to is dispatch.To.PYTORCH
    with autosyncbn.sync_report():
        assert not dispatch.nothing_to_synchronize()
    assert not autosyncbn.replicas.live_groups()


# -- found in review: a layer called twice in one checkpointed segment, batch_norm imported by name ----
class TwiceInASegment(nn.Module):
    """IBN-Net's shape: after InstanceNorm both calls of ``bn`` see slices of about equal mean."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv, self.inorm, self.bn = nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4), nn.BatchNorm2d(4)

    def segment(self, x):
        a = self.inorm(self.conv(x))
        return self.bn(a * 3) + self.bn(a)

    def forward(self, x):
        return checkpointing.checkpoint(self.segment, x, use_reentrant=self.mode == "reentrant")


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_a_layer_called_twice_in_a_checkpointed_segment_replays_each_call(mode, installed):
    model = TwiceInASegment(mode)
    reference = copy.deepcopy(model)
    x = input_of_rank(4, 6, channels=3)
    x_par, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_of(EmulatedDataParallel(model, 3)(x_par), torch.ones(6, 4, 4, 5)).backward()
    loss_of(reference(x_ref), torch.ones(6, 4, 4, 5)).backward()
    assert_close_to_scale(x_par.grad, x_ref.grad, what="input grad")
    assert_models_match(model, reference)  # running_var: each recompute replays its own call


def test_a_forward_calling_batch_norm_imported_by_name_synchronizes():
    from torch.nn.functional import batch_norm

    class ByName(autosyncbn.SynchronizedBatchNorm2d):
        def forward(self, x):
            return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps)

    model, reference = ByName(3), nn.BatchNorm2d(3)
    x = torch.randn(7, 3, 2, 2) * 2 + 1
    torch.testing.assert_close(EmulatedDataParallelWithCallback(model, 3)(x), reference(x), atol=2e-5, rtol=0)
    torch.testing.assert_close(model.running_var, reference.running_var)
