"""install / uninstall / patched: idempotent, exact restore, nesting, coverage of DataParallel's paths."""
from __future__ import annotations

import itertools
import sys

import pytest
import torch
import wrapt
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel, _cpu_replication

from conftest import PRISTINE, _PATCHED, _snapshot
from helpers import ConvBlock, input_of_rank

data_parallel_module = sys.modules["torch.nn.parallel.data_parallel"]


def synchronizes() -> bool:
    """Behavioural check: does a 4-replica forward use whole-batch statistics?"""
    layer = nn.BatchNorm1d(2)
    x = torch.cat([torch.zeros(2, 2), torch.full((2, 2), 10.0)]).requires_grad_()
    x = x + torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    out = EmulatedDataParallel(layer, 2)(x)
    whole = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True)
    return torch.allclose(out, whole, atol=1e-5)


def test_import_patches_nothing():
    assert _snapshot() == PRISTINE
    assert not autosyncbn.is_installed()
    assert not synchronizes()


def test_install_wraps_with_wrapt_and_uninstall_restores_exact_objects():
    autosyncbn.install()
    assert autosyncbn.is_installed()
    assert isinstance(vars(nn.DataParallel)["replicate"], wrapt.FunctionWrapper)
    assert isinstance(vars(data_parallel_module)["replicate"], wrapt.FunctionWrapper)
    assert isinstance(vars(_BatchNorm)["forward"], wrapt.FunctionWrapper)
    assert vars(nn.DataParallel)["replicate"].__wrapped__ is PRISTINE[0]
    assert synchronizes()
    autosyncbn.uninstall()
    assert not autosyncbn.is_installed()
    for (owner, name), original in zip(_PATCHED, PRISTINE):
        assert vars(owner).get(name) is original, f"{owner}.{name} not restored"
    # Subclasses that inherit forward got no shadow attribute.
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LazyBatchNorm2d):
        assert "forward" not in vars(cls)
    assert not synchronizes()


def test_install_twice_never_wraps_twice():
    autosyncbn.install()
    first = vars(_BatchNorm)["forward"]
    autosyncbn.install()
    assert vars(_BatchNorm)["forward"] is first
    assert not isinstance(first.__wrapped__, wrapt.FunctionWrapper)
    autosyncbn.uninstall()
    autosyncbn.uninstall()
    assert _snapshot() == PRISTINE


@pytest.mark.parametrize("order", list(itertools.product(["install", "uninstall", "patched"], repeat=3)))
def test_lifecycle_orders(order):
    for step in order:
        if step == "install":
            autosyncbn.install()
        elif step == "uninstall":
            autosyncbn.uninstall()
        else:
            was = autosyncbn.is_installed()
            with autosyncbn.patched():
                assert autosyncbn.is_installed() and synchronizes()
            assert autosyncbn.is_installed() == was
        assert synchronizes() == autosyncbn.is_installed()
        assert isinstance(vars(_BatchNorm)["forward"], wrapt.FunctionWrapper) == autosyncbn.is_installed()
    autosyncbn.uninstall()
    assert _snapshot() == PRISTINE
    autosyncbn.install()
    assert synchronizes(), "re-install after the sequence must work"
    autosyncbn.uninstall()


def test_nested_patched_scopes_restore_what_they_found():
    with autosyncbn.patched(timeout=11):
        with autosyncbn.patched(timeout=22):
            assert autosyncbn.patching._options.timeout == 22
        assert autosyncbn.is_installed()
        assert autosyncbn.patching._options.timeout == 11
    assert not autosyncbn.is_installed()
    assert _snapshot() == PRISTINE


def test_patched_restores_after_an_exception():
    with pytest.raises(KeyError):
        with autosyncbn.patched():
            raise KeyError("boom")
    assert not autosyncbn.is_installed() and _snapshot() == PRISTINE


def test_failed_install_rolls_back(monkeypatch):
    from autosyncbn import patching

    real_apply = patching._apply
    calls = []

    def failing_apply(patch):
        if calls:
            raise RuntimeError("simulated failure")
        calls.append(patch)
        real_apply(patch)

    monkeypatch.setattr(patching, "_apply", failing_apply)
    with pytest.raises(RuntimeError, match="simulated"):
        autosyncbn.install()
    assert not autosyncbn.is_installed()
    assert _snapshot() == PRISTINE


def test_subclass_that_calls_super_replicate_is_covered(installed):
    class LoggingDataParallel(EmulatedDataParallel):
        calls = 0

        def replicate(self, module, device_ids):
            LoggingDataParallel.calls += 1
            return super().replicate(module, device_ids)

    model = ConvBlock(2)
    reference = ConvBlock(2)
    reference.load_state_dict(model.state_dict())
    x = input_of_rank(2, 8)
    torch.testing.assert_close(LoggingDataParallel(model, 4)(x), reference(x), atol=1e-5, rtol=1e-4)
    assert LoggingDataParallel.calls == 1


def test_functional_data_parallel_replicate_is_hooked(installed):
    # torch.nn.parallel.data_parallel() needs GPUs; its replicate() is the hooked
    # module global, exercised here on CPU replicas.
    model = ConvBlock(2)
    with _cpu_replication():
        replicas = data_parallel_module.replicate(model, [0, 1, 2])
    handles = [r.bn1.__dict__.get("_autosyncbn_sync") for r in replicas]
    assert [h.replica for h in handles] == [0, 1, 2]
    assert handles[0].group is handles[2].group


def test_exclude_predicate_and_marker_leave_layers_per_slice():
    model = ConvBlock(2)
    with autosyncbn.patched(exclude=lambda name, layer: name == "bn2"):
        parallel = EmulatedDataParallel(model, 2)
        with _cpu_replication():
            replicas = parallel.replicate(model, [0, 1])
        assert "_autosyncbn_sync" in replicas[0].bn1.__dict__
        assert "_autosyncbn_sync" not in replicas[0].bn2.__dict__
    autosyncbn.exclude(model.bn1)
    with autosyncbn.patched():
        with _cpu_replication():
            replicas = parallel.replicate(model, [0, 1])
        assert "_autosyncbn_sync" not in replicas[1].bn1.__dict__
        assert "_autosyncbn_sync" in replicas[1].bn2.__dict__
        # An excluded layer computes per-slice statistics, as plain DataParallel does.
        layer = nn.BatchNorm1d(3)
        autosyncbn.exclude(layer)
        x = torch.randn(8, 3)
        out = EmulatedDataParallel(layer, 2)(x)
        per_slice = torch.cat([nn.functional.batch_norm(p, None, None, layer.weight, layer.bias, True) for p in x.chunk(2)])
        torch.testing.assert_close(out, per_slice)
    autosyncbn.include(model)
    assert "_autosyncbn_excluded" not in model.bn1.__dict__


def test_distributed_option_without_a_process_group_is_pytorch_bit_for_bit():
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3)
    twin = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with autosyncbn.patched(distributed=True):
        out = layer(x)
    assert torch.equal(out, twin(x))
    assert torch.equal(layer.running_var, twin.running_var)
