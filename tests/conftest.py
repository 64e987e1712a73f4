"""Shared fixtures: a leaked patch fails the test that leaked it."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import autosyncbn

_PATCHED = [
    # install()'s table (autosyncbn.patching._patch_table): F.batch_norm, every name of replicate
    # and parallel_apply, reentrant checkpointing, and _BatchNorm's _call_impl (for torch.compile)
    (torch.nn.functional, "batch_norm"),
    (nn.DataParallel, "replicate"),
    *[(owner, name) for owner in (sys.modules["torch.nn.parallel.data_parallel"],
                                  sys.modules["torch.nn.parallel.replicate"], torch.nn.parallel)
      for name in ("replicate", "parallel_apply") if name in vars(owner)],
    (sys.modules["torch.nn.parallel.parallel_apply"], "parallel_apply"),
    (torch.utils.checkpoint.CheckpointFunction, "apply"),
    (sys.modules["torch.nn.modules.batchnorm"]._BatchNorm, "_call_impl"),
    # autosyncbn.testing's CPU broadcast seam, and patch_sync_batchnorm's name rebinding
    (sys.modules["torch.nn.parallel.replicate"], "_broadcast_coalesced_reshape"),
    *[(namespace, name) for namespace in (nn, sys.modules["torch.nn.modules"],
                                          sys.modules["torch.nn.modules.batchnorm"])
      for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")],
]


def _snapshot() -> list:
    return [vars(owner).get(name) for owner, name in _PATCHED]


PRISTINE = _snapshot()


@pytest.fixture(autouse=True)
def pristine_patches():
    """Every test starts and ends with PyTorch exactly as it was imported."""
    assert _snapshot() == PRISTINE and not autosyncbn.is_installed(), "a patch leaked in"
    torch.manual_seed(0)
    yield
    leaked = autosyncbn.is_installed() or _snapshot() != PRISTINE or autosyncbn.get_sbn_eps_mode() != "plus"
    autosyncbn.uninstall()
    autosyncbn.set_sbn_eps_mode("plus")
    assert not leaked, "this test left autosyncbn patches installed (or the eps mode changed)"


@pytest.fixture
def installed():
    """autosyncbn installed for the test only."""
    with autosyncbn.patched():
        yield
