"""A PyTorch without one of the private APIs autosyncbn uses: the import works, each path falls back
or raises an error that names the version (issue 22, item 3)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autosyncbn import private_api

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_name_gives_its_fallback_and_is_recorded():
    class Owner:
        present = "the real one"

    fallback = object()
    assert private_api.private(Owner, "present", fallback) == "the real one"
    assert private_api.private(Owner, "absent", fallback) is fallback
    assert private_api.MISSING[-1] == "Owner.absent"
    private_api.MISSING.pop()


def test_the_error_names_the_version_and_what_needs_it():
    error = private_api.missing("torch.something._private", "Doing a thing")
    assert isinstance(error, private_api.MissingPrivateAPIError)
    assert torch.__version__ in str(error) and "Doing a thing" in str(error) and "2.13" in str(error)


_WITHOUT_PRIVATE_NAMES = """
import copy, sys
import torch
import torch.autograd.forward_ad
import torch.nn.parallel.replicate
# Gone while autosyncbn is imported (PyTorch itself still needs them afterwards)
names = [(torch._C, "_are_functorch_transforms_active"), (torch._C._autograd, "_top_saved_tensors_default_hooks"),
         (torch.autograd.forward_ad, "_current_level")]
kept = [getattr(owner, name) for owner, name in names]
for owner, name in names:
    delattr(owner, name)
{extra}
import autosyncbn
import autosyncbn.testing
from autosyncbn import private_api
for (owner, name), value in zip(names, kept):
    setattr(owner, name, value)
print("missing:", sorted(private_api.MISSING))
sys.path.insert(0, {tests!r})
from helpers import ConvBlock, assert_models_match, input_of_rank
from autosyncbn.testing import EmulatedDataParallel
model = ConvBlock(4)
reference = copy.deepcopy(model)
x = input_of_rank(4, 7)
try:
    with autosyncbn.patched():
        out = EmulatedDataParallel(model, 3)(x)
except autosyncbn.SyncBatchNormError as error:
    print("error:", error)
    raise SystemExit(0)
out.square().mean().backward()
reference(x).square().mean().backward()
assert_models_match(model, reference)
print("synchronized step equals one device")
"""


def _run(extra: str = "") -> str:
    code = _WITHOUT_PRIVATE_NAMES.format(extra=extra, tests=str(ROOT / "tests"))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=100, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_without_private_autograd_names_autosyncbn_imports_and_synchronizes():
    out = _run()
    assert "_are_functorch_transforms_active" in out and "_top_saved_tensors_default_hooks" in out
    assert "synchronized step equals one device" in out


def test_without_the_broadcast_seam_emulated_replicas_raise_naming_the_version():
    out = _run("del sys.modules['torch.nn.parallel.replicate']._broadcast_coalesced_reshape")
    assert "error:" in out and "_broadcast_coalesced_reshape" in out and torch.__version__ in out
