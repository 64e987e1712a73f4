"""install / uninstall / patched: idempotent, exact restore, nesting, and every DataParallel path."""
from __future__ import annotations

import copy
import itertools
import sys

import pytest
import torch
import wrapt
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel, _cpu_replication
from autosyncbn.wrapping import Patch

from conftest import PRISTINE, _PATCHED, _snapshot
from helpers import ConvBlock, input_of_rank, run_in_threads

data_parallel_module = sys.modules["torch.nn.parallel.data_parallel"]
parallel_apply_module = sys.modules["torch.nn.parallel.parallel_apply"]
OUR_TARGETS = [(torch.nn.functional, "batch_norm"), (data_parallel_module, "parallel_apply"),
               (parallel_apply_module, "parallel_apply"), (torch.nn.parallel, "parallel_apply")]


def synchronizes() -> bool:
    """Behavioural check: does a 2-replica forward use whole-batch statistics?"""
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
    for owner, name in OUR_TARGETS:
        assert isinstance(vars(owner)[name], wrapt.FunctionWrapper), name
    assert vars(torch.nn.functional)["batch_norm"].__wrapped__ is PRISTINE[0]
    assert synchronizes()
    autosyncbn.uninstall()
    assert not autosyncbn.is_installed()
    for (owner, name), original in zip(_PATCHED, PRISTINE):
        assert vars(owner).get(name) is original, f"{owner}.{name} not restored"
    # Subclasses that inherit the patched names got no shadow attribute.
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.LazyBatchNorm2d):
        assert "forward" not in vars(cls)
    assert not synchronizes()


def test_install_twice_never_wraps_twice():
    autosyncbn.install()
    first = vars(torch.nn.functional)["batch_norm"]
    autosyncbn.install(timeout=5)
    assert vars(torch.nn.functional)["batch_norm"] is first
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
        assert isinstance(vars(torch.nn.functional)["batch_norm"], wrapt.FunctionWrapper) == autosyncbn.is_installed()
    autosyncbn.uninstall()
    assert _snapshot() == PRISTINE
    autosyncbn.install()
    assert synchronizes(), "re-install after the sequence must work"
    autosyncbn.uninstall()


def test_nested_patched_scopes_restore_what_they_found():
    from autosyncbn import settings

    with autosyncbn.patched(timeout=11):
        with autosyncbn.patched(timeout=22):
            assert settings.current().timeout == 22
        assert autosyncbn.is_installed()
        assert settings.current().timeout == 11
    assert not autosyncbn.is_installed()
    assert _snapshot() == PRISTINE


def test_uninstall_inside_a_scope_ends_only_the_explicit_install():
    autosyncbn.install()
    with autosyncbn.patched():
        autosyncbn.uninstall()
        assert autosyncbn.is_installed() and synchronizes()  # the scope still holds
    assert not autosyncbn.is_installed() and _snapshot() == PRISTINE


def test_patched_restores_after_an_exception():
    with pytest.raises(KeyError):
        with autosyncbn.patched():
            raise KeyError("boom")
    assert not autosyncbn.is_installed() and _snapshot() == PRISTINE


def test_failed_install_rolls_back(monkeypatch):
    real_apply = Patch.apply
    calls = []

    def failing_apply(patch):
        if calls:
            raise RuntimeError("simulated failure")
        calls.append(patch)
        real_apply(patch)

    monkeypatch.setattr(Patch, "apply", failing_apply)
    with pytest.raises(RuntimeError, match="simulated"):
        autosyncbn.install()
    monkeypatch.undo()
    assert not autosyncbn.is_installed()
    assert _snapshot() == PRISTINE
    autosyncbn.install()  # and a later install works
    assert synchronizes()
    autosyncbn.uninstall()


def test_outside_data_parallel_is_pytorch_bit_for_bit():
    torch.manual_seed(5)
    model = ConvBlock(4)
    twin = copy.deepcopy(model)
    x = input_of_rank(4, 8).requires_grad_()
    x_twin = x.detach().clone().requires_grad_()
    expected = twin(x_twin)
    with autosyncbn.patched():
        out = model(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(x.grad, x_twin.grad)
    for b, c in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, c)


def test_subclass_that_calls_super_replicate_is_covered(installed):
    class LoggingDataParallel(EmulatedDataParallel):
        calls = 0

        def replicate(self, module, device_ids):
            LoggingDataParallel.calls += 1
            return super().replicate(module, device_ids)

    model = ConvBlock(2)
    reference = copy.deepcopy(model)
    x = input_of_rank(2, 8)
    torch.testing.assert_close(LoggingDataParallel(model, 4)(x), reference(x), atol=1e-5, rtol=1e-4)
    assert LoggingDataParallel.calls == 1


def test_subclass_whose_replicate_skips_super_is_covered(installed):
    """Replicas are prepared where they run (parallel_apply), however they were made."""

    class OwnReplicate(EmulatedDataParallel):
        def replicate(self, module, device_ids):
            with _cpu_replication():
                return torch.nn.parallel.replicate(module, device_ids)

    model = ConvBlock(2)
    reference = copy.deepcopy(model)
    x = input_of_rank(2, 8)
    torch.testing.assert_close(OwnReplicate(model, 4)(x), reference(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["method", "data_parallel", "replicate_module", "package"])
def test_every_name_of_replicate_is_hooked(installed, name):
    # Code that makes replicas by any name of replicate gets synchronized replicas, whoever runs them.
    layer = nn.BatchNorm1d(3)
    make = {"method": lambda: nn.DataParallel.replicate(EmulatedDataParallel(layer, 2), layer, [0, 1]),
            "data_parallel": lambda: data_parallel_module.replicate(layer, [0, 1]),
            "replicate_module": lambda: sys.modules["torch.nn.parallel.replicate"].replicate(layer, [0, 1]),
            "package": lambda: torch.nn.parallel.replicate(layer, [0, 1])}[name]
    x = torch.randn(8, 3) + torch.arange(8.0).unsqueeze(1)
    with _cpu_replication():
        replicas = make()
    outputs = run_in_threads(replicas, [(p,) for p in x.chunk(2)])
    torch.testing.assert_close(torch.cat(outputs), nn.BatchNorm1d(3)(x), atol=1e-5, rtol=1e-5)


def test_exclude_predicate_and_marker_leave_layers_per_slice():
    def per_slice(layer, x):
        return torch.cat([nn.functional.batch_norm(p, None, None, layer.weight, layer.bias, True)
                          for p in x.chunk(2)])

    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    x = torch.randn(8, 3) * 3 + torch.arange(8.0).unsqueeze(1)
    with autosyncbn.patched(exclude=lambda name, layer: name == "1"), autosyncbn.sync_report() as report:
        EmulatedDataParallel(model, 2)(x)
    assert report.synchronized == ["0"] and report.per_slice == {"1": ["excluded"]}
    autosyncbn.exclude(model[0])
    with autosyncbn.patched():
        layer = nn.BatchNorm1d(3)
        autosyncbn.exclude(layer)
        torch.testing.assert_close(EmulatedDataParallel(layer, 2)(x), per_slice(layer, x))
    autosyncbn.include(model)
    assert "_autosyncbn_excluded" not in model[0].__dict__


def test_distributed_option_without_a_process_group_is_pytorch_bit_for_bit():
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3)
    twin = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with autosyncbn.patched(distributed=True):
        out = layer(x)
    assert torch.equal(out, twin(x))
    assert torch.equal(layer.running_var, twin.running_var)


def test_the_guard_covers_every_patch_install_applies():
    """A patch the guard does not list could leak unnoticed."""
    from autosyncbn.patching import PATCHES

    from conftest import _PATCHED

    guarded = {(id(owner), name) for owner, name in _PATCHED}
    table = PATCHES._make()
    assert table and all((id(patch.owner), patch.attribute) in guarded for patch in table)
