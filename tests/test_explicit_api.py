"""SynchronizedBatchNorm*d, DataParallelWithCallback, patch_replication_callback, convert/revert."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import autosyncbn
from autosyncbn import (
    DataParallelWithCallback,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    convert_model,
    patch_replication_callback,
    revert_model,
)
from autosyncbn.testing import EmulatedDataParallel

from helpers import ConvBlock, assert_close_to_scale, assert_models_match, input_of_rank, train_side_by_side


def explicit_parallel(model: nn.Module, n: int) -> nn.DataParallel:
    parallel = EmulatedDataParallel(model, n)
    patch_replication_callback(parallel)
    return parallel


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_converted_model_synchronizes_without_install(rank):
    model = convert_model(ConvBlock(rank))
    assert isinstance(model.bn1, SynchronizedBatchNorm1d if rank < 4 else (SynchronizedBatchNorm2d if rank == 4 else SynchronizedBatchNorm3d))
    inputs = [input_of_rank(rank, 10).requires_grad_() for _ in range(3)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(model, inputs, 4, wrap=explicit_parallel):
        assert_close_to_scale(out, ref_out, what="output")
        assert_close_to_scale(x.grad, x_ref.grad, what="input grad")
        assert_models_match(trained, reference)
    assert not autosyncbn.is_installed()


def test_plain_batchnorm_stays_per_slice_without_install():
    layer = nn.BatchNorm1d(3)
    x = torch.randn(8, 3) + torch.arange(8.0).unsqueeze(1)
    out = explicit_parallel(layer, 2)(x)
    per_slice = torch.cat([nn.functional.batch_norm(p, None, None, layer.weight, layer.bias, True) for p in x.chunk(2)])
    torch.testing.assert_close(out, per_slice)


def test_synchronized_classes_are_batchnorm_subclasses_with_same_state_dict():
    for sync, plain in [(SynchronizedBatchNorm1d, nn.BatchNorm1d), (SynchronizedBatchNorm2d, nn.BatchNorm2d),
                        (SynchronizedBatchNorm3d, nn.BatchNorm3d)]:
        layer = sync(5, eps=1e-3, momentum=0.2)
        assert isinstance(layer, plain)
        assert layer.state_dict().keys() == plain(5).state_dict().keys()
        assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, 0.2, True, True)


def test_synchronized_class_outside_parallel_is_pytorch():
    layer = SynchronizedBatchNorm2d(4)
    twin = nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    assert torch.equal(layer(x), twin(x))
    assert torch.equal(layer.running_var, twin.running_var)


def test_patch_replication_callback_is_idempotent():
    parallel = EmulatedDataParallel(convert_model(ConvBlock(2)), 2)
    patch_replication_callback(parallel)
    first = parallel.__dict__["replicate"]
    patch_replication_callback(parallel, timeout=7)
    hook = parallel.__dict__["replicate"]
    assert hook is not first and hook.plan.timeout == 7 and hook.data_parallel is parallel
    x = input_of_rank(2, 8)
    reference = copy.deepcopy(parallel.module)
    assert_close_to_scale(parallel(x), reference(x))
    with pytest.raises(TypeError):
        patch_replication_callback(nn.Linear(2, 2))


def test_classic_replication_callback_is_honoured():
    seen = []

    class Classic(nn.Module):
        def __data_parallel_replicate__(self, ctx, copy_id):
            seen.append((id(ctx), copy_id))
            if copy_id == 0:
                ctx.master = "set by copy 0"
            else:
                assert ctx.master == "set by copy 0"

        def forward(self, x):
            return x * 2

    explicit_parallel(nn.Sequential(nn.Linear(3, 3), Classic()), 3)(torch.randn(6, 3))
    assert [copy_id for _, copy_id in seen] == [0, 1, 2]
    assert len({ctx for ctx, _ in seen}) == 1
    seen.clear()
    with autosyncbn.patched():
        EmulatedDataParallel(nn.Sequential(Classic()), 2)(torch.randn(4, 3))
    assert [copy_id for _, copy_id in seen] == [0, 1]


def test_convert_model_keeps_everything():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, eps=1e-3, momentum=None, affine=True, track_running_stats=True),
        nn.BatchNorm1d(4, affine=False, track_running_stats=False),
        nn.BatchNorm3d(4).double(),
    )
    model[1].weight.requires_grad_(False)
    model[1].running_mean.fill_(3.0)
    model[1].num_batches_tracked.fill_(7)
    model[1].eval()
    hook_calls = []
    model[1].register_forward_hook(lambda *a: hook_calls.append(1))
    params = [p for p in model.parameters()]
    converted = convert_model(model)
    assert converted is model  # the container itself is kept; children are replaced
    bn = converted[1]
    assert type(bn) is SynchronizedBatchNorm2d
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.training) == (1e-3, None, True, True, False)
    assert bn.weight.requires_grad is False
    assert bn.running_mean[0].item() == 3.0 and bn.num_batches_tracked.item() == 7
    assert type(converted[2]) is SynchronizedBatchNorm1d and converted[2].running_mean is None
    assert type(converted[3]) is SynchronizedBatchNorm3d and converted[3].weight.dtype == torch.float64
    assert [p for p in converted.parameters()] == params  # same objects: optimizers stay valid
    bn(torch.randn(2, 4, 3, 3))
    assert hook_calls == [1]
    reverted = revert_model(converted)
    assert type(reverted[1]) is nn.BatchNorm2d and reverted[1].weight is params[2]
    assert type(reverted[3]) is nn.BatchNorm3d


def test_convert_data_parallel_wrapper():
    dp = nn.DataParallel(ConvBlock(4))
    converted = convert_model(dp)
    assert isinstance(converted, DataParallelWithCallback)
    assert converted.device_ids == dp.device_ids
    assert isinstance(converted.module.bn1, SynchronizedBatchNorm2d)
    back = revert_model(converted)
    assert type(back) is nn.DataParallel and type(back.module.bn1) is nn.BatchNorm2d


def test_convert_and_revert_torch_sync_batchnorm():
    sync = nn.SyncBatchNorm(4, momentum=0.3)
    reverted = revert_model(nn.Sequential(sync))
    layer = reverted[0]
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm) and not isinstance(layer, nn.SyncBatchNorm)
    assert layer.momentum == 0.3 and layer.weight is sync.weight
    x = torch.randn(4, 4, 3)
    torch.testing.assert_close(layer(x), nn.functional.batch_norm(x, None, None, sync.weight, sync.bias, True))
    converted = convert_model(nn.Sequential(nn.SyncBatchNorm(4)))
    assert type(converted[0]) is autosyncbn.SynchronizedBatchNorm


def test_state_dict_roundtrip_between_plain_and_synchronized():
    plain = ConvBlock(4)
    plain(input_of_rank(4, 6))
    converted = convert_model(copy.deepcopy(plain))
    fresh = ConvBlock(4)
    fresh.load_state_dict(converted.state_dict())
    for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


class SlowSmallSlice(nn.Module):
    """The replica with the smallest slice is late to its BatchNorm call."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = SynchronizedBatchNorm1d(3)

    def forward(self, x):
        if x.shape[0] == 1:
            time.sleep(1.5)
        return self.bn(x)


@pytest.mark.timeout(30)
def test_explicit_api_timeout_is_configurable():
    from autosyncbn.testing import EmulatedDataParallelWithCallback

    for parallel in (EmulatedDataParallelWithCallback(SlowSmallSlice(), 3, timeout=0.3),
                     _patched(EmulatedDataParallel(SlowSmallSlice(), 3), timeout=0.3)):
        with pytest.raises(autosyncbn.SyncTimeoutError, match="waited 0.3s"):
            parallel(torch.randn(7, 3))  # slices 3, 3, 1
    assert DataParallelWithCallback(nn.Linear(2, 2), timeout=3.0).sync_timeout == 3.0
    with pytest.raises(ValueError, match="positive, finite"):
        DataParallelWithCallback(nn.Linear(2, 2), timeout=0)


def _patched(parallel, **options):
    patch_replication_callback(parallel, **options)
    return parallel
