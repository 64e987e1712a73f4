"""Real nn.DataParallel on CUDA. Skipped without a GPU; must pass with one."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import autosyncbn

from helpers import ConvBlock, assert_close_to_scale, assert_models_match, input_of_rank, loss_of

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.cuda, needs_cuda]


def device_lists():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lists = [[0, 0, 0, 0]]  # one device named several times
    if count >= 2:
        lists.append(list(range(count)))
    return lists


@pytest.mark.parametrize("device_ids", device_lists(), ids=str)
@pytest.mark.parametrize("explicit", [False, True], ids=["install", "explicit"])
def test_real_data_parallel_matches_one_device(device_ids, explicit):
    torch.manual_seed(0)
    model = ConvBlock(4).cuda()
    reference = copy.deepcopy(model)
    if explicit:
        parallel = autosyncbn.DataParallelWithCallback(autosyncbn.convert_model(model), device_ids=device_ids)
        scope = contextlib.nullcontext()
    else:
        parallel = nn.DataParallel(model, device_ids=device_ids)
        scope = autosyncbn.patched()
    model = parallel.module
    with scope:
        for _ in range(3):
            x = input_of_rank(4, 10).cuda().requires_grad_()
            x_ref = x.detach().clone().requires_grad_()
            out, ref_out = parallel(x), reference(x_ref)
            target = torch.randn_like(ref_out)
            loss_of(out, target).backward()
            loss_of(ref_out, target).backward()
            assert_close_to_scale(out, ref_out, 1e-4, "output")
            assert_close_to_scale(x.grad, x_ref.grad, 1e-4, "input grad")
            assert_models_match(model, reference, rel=1e-4)


def test_half_precision_autocast_on_cuda():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)).cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6, device="cuda") * 3 + 1
    with autosyncbn.patched(), torch.autocast("cuda", dtype=torch.float16):
        out = nn.DataParallel(model, device_ids=[0, 0])(x)
        ref_out = reference(x)
    assert out.dtype == ref_out.dtype
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, atol=1e-3, rtol=1e-3)


def test_inputs_on_mismatched_devices_raise_like_pytorch():
    layer = nn.BatchNorm2d(4).cuda()
    x = torch.randn(4, 4, 3, 3)  # on the CPU
    with pytest.raises(RuntimeError):
        layer(x)
    with autosyncbn.patched(), pytest.raises(RuntimeError):
        layer(x)
