"""Coming from sync_batchnorm: the same names and call signatures."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel

from distributed_helpers import run_ranks
from helpers import assert_close_to_scale


def test_classic_names_and_signatures():
    for name in ("SynchronizedBatchNorm1d", "SynchronizedBatchNorm2d", "SynchronizedBatchNorm3d",
                 "DataParallelWithCallback", "patch_replication_callback", "convert_model",
                 "patch_sync_batchnorm", "set_sbn_eps_mode"):
        assert hasattr(autosyncbn, name), name
    layer = autosyncbn.SynchronizedBatchNorm2d(8, 1e-3, 0.2, False)  # classic positional order
    assert (layer.num_features, layer.eps, layer.momentum, layer.affine) == (8, 1e-3, 0.2, False)
    parameters = list(inspect.signature(autosyncbn.DataParallelWithCallback).parameters)
    assert parameters[:4] == ["module", "device_ids", "output_device", "dim"]
    assert list(inspect.signature(autosyncbn.patch_replication_callback).parameters)[0] == "data_parallel"
    # Anything added is keyword-only, so classic positional calls mean the same.
    for function in (autosyncbn.DataParallelWithCallback, autosyncbn.patch_replication_callback):
        extra = [p for p in inspect.signature(function).parameters.values()
                 if p.name not in ("module", "device_ids", "output_device", "dim", "data_parallel")]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert list(inspect.signature(autosyncbn.convert_model).parameters)[0] == "module"


def test_patch_sync_batchnorm_builds_synchronized_layers_and_restores():
    original = nn.BatchNorm2d
    with autosyncbn.patch_sync_batchnorm():
        with autosyncbn.patch_sync_batchnorm():  # nests
            layer = nn.BatchNorm2d(4)
        assert nn.BatchNorm2d is autosyncbn.SynchronizedBatchNorm2d
        assert isinstance(torch.nn.modules.batchnorm.BatchNorm1d(3), autosyncbn.SynchronizedBatchNorm1d)
    assert type(layer) is autosyncbn.SynchronizedBatchNorm2d
    assert nn.BatchNorm2d is original
    with pytest.raises(KeyError):
        with autosyncbn.patch_sync_batchnorm():
            raise KeyError("boom")
    assert nn.BatchNorm2d is original and nn.BatchNorm3d is torch.nn.modules.batchnorm.BatchNorm3d


def test_eps_mode_validation():
    assert autosyncbn.get_sbn_eps_mode() == "plus"
    with pytest.raises(ValueError, match="clamp"):
        autosyncbn.set_sbn_eps_mode("sqrt")


def clamp_reference(x, weight, bias, eps):
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / var.clamp(min=eps).sqrt() * weight.view(shape) + bias.view(shape)


@pytest.fixture(params=["clamp", "plus"])
def mode(request):
    autosyncbn.set_sbn_eps_mode(request.param)
    yield request.param
    autosyncbn.set_sbn_eps_mode("plus")


def test_eps_modes_under_data_parallel(installed, mode):
    torch.manual_seed(0)
    layer = nn.BatchNorm1d(3, eps=1e-2).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    x = torch.randn(8, 3, dtype=torch.float64)
    x[:, 1] = x[:, 1] * 1e-3  # variance far below eps: the two modes differ here
    x = x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    reference = copy.deepcopy(layer)
    out = EmulatedDataParallel(layer, 4)(x)
    if mode == "clamp":
        expected = clamp_reference(x_ref, reference.weight, reference.bias, layer.eps)
    else:
        expected = reference(x_ref)
    target = torch.randn(8, 3, dtype=torch.float64)
    (out * target).sum().backward()
    (expected * target).sum().backward()
    assert_close_to_scale(out, expected, 1e-10, "output")
    assert_close_to_scale(x.grad, x_ref.grad, 1e-10, "input grad")
    assert_close_to_scale(layer.weight.grad, reference.weight.grad, 1e-10, "weight grad")


def worker_eps_clamp(rank, world):
    autosyncbn.set_sbn_eps_mode("clamp")
    torch.manual_seed(0)
    layer = autosyncbn.SynchronizedBatchNorm1d(3, eps=1e-2).double()
    reference = copy.deepcopy(layer)
    x_all = torch.randn(8, 3, dtype=torch.float64)
    x_all[:, 1] *= 1e-3
    x_ref = x_all.clone().requires_grad_()
    x = x_all.chunk(world)[rank].clone().requires_grad_()
    target = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    (out * target.chunk(world)[rank]).sum().backward()
    expected = clamp_reference(x_ref, reference.weight, reference.bias, 1e-2)
    (expected * target).sum().backward()
    assert_close_to_scale(out, expected.chunk(world)[rank].detach(), 1e-10, "output")
    assert_close_to_scale(x.grad, x_ref.grad.chunk(world)[rank], 1e-10, "input grad")


def test_eps_clamp_over_a_process_group():
    run_ranks(worker_eps_clamp, 2)
