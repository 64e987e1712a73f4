"""``python -m autosyncbn migrate``: a repository that vendors sync_batchnorm moves to autosyncbn.

``fixtures/classic_repo`` is a small repository in the usual shape (a DeepLab
model with ``modeling/sync_batchnorm/`` vendored); each test migrates a copy.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autosyncbn.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "classic_repo"
VENDORED = "modeling/sync_batchnorm"

ASPP_BEFORE = """\
from .sync_batchnorm.batchnorm import (  # the vendored copy
    SynchronizedBatchNorm2d,  # used when sync_bn is on
    SyncMaster,  # only for master_type() below
)
"""
ASPP_LEFTOVER = """\
from .sync_batchnorm.batchnorm import (  # the vendored copy
    SyncMaster,  # only for master_type() below
)
"""
ASPP_AFTER = """\
from autosyncbn import (  # the vendored copy
    SynchronizedBatchNorm2d,  # used when sync_bn is on
)
""" + ASPP_LEFTOVER

#: Every change ``--write`` makes to the fixture, as (old, new) text; nothing else may change.
EXPECTED = {
    "train.py": [("from modeling.sync_batchnorm.replicate import patch_replication_callback\n",
                  "from autosyncbn import patch_replication_callback\n")],
    "modeling/deeplab.py": [
        ("from modeling.sync_batchnorm.batchnorm import SynchronizedBatchNorm2d\n",
         "from autosyncbn import SynchronizedBatchNorm2d\n"),
        ("import modeling.sync_batchnorm as sbn  # module alias, used as sbn.NAME below\n",
         "import autosyncbn as sbn  # module alias, used as sbn.NAME below\n"),
    ],
    "modeling/backbone/resnet.py": [
        ("from ..sync_batchnorm import SynchronizedBatchNorm2d as SyncBN  # relative, two dots\n",
         "from autosyncbn import SynchronizedBatchNorm2d as SyncBN  # relative, two dots\n"),
    ],
    "modeling/aspp.py": [(ASPP_BEFORE, ASPP_AFTER)],
}

#: Builds the migrated model through the repository's own entry point, in a fresh interpreter.
IMPORT_CHECK = """\
import torch
import autosyncbn
import train

model = train.build(num_classes=3)
assert model(torch.randn(4, 3, 8, 8)).shape == (4, 3, 8, 8)
layers = model.module.synchronized_layers()
assert len(layers) == 4 and all(type(m) is autosyncbn.SynchronizedBatchNorm2d for m in layers), layers
print("migrated model ok")
"""


def migrate(*args: object) -> int:
    return main(["migrate", *map(str, args)])


def snapshot(root: Path) -> "dict[str, bytes]":
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_after(before: "dict[str, bytes]") -> "dict[str, bytes]":
    after = dict(before)
    for name, changes in EXPECTED.items():
        text = before[name].decode()
        for old, new in changes:
            assert text.count(old) == 1, (name, old)
            text = text.replace(old, new)
        after[name] = text.encode()
    return after


def run_python(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh copy of the classic repository."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "repo", ignore=shutil.ignore_patterns("__pycache__")))


@pytest.fixture
def vendored_only(tmp_path: Path) -> Path:
    """A repository holding only ``modeling/sync_batchnorm``: each case adds one file."""
    root = tmp_path / "repo"
    shutil.copytree(FIXTURE / VENDORED, root / VENDORED, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "modeling" / "__init__.py").write_text("")
    return root


def test_dry_run_prints_a_diff_and_changes_nothing(repo, capsys):
    before = snapshot(repo)
    assert migrate(repo) == 1  # SyncMaster is left for the user
    printed = capsys.readouterr()
    assert snapshot(repo) == before
    assert printed.out.startswith("--- a/")  # stdout is the patch alone
    for name in EXPECTED:
        assert f"--- a/{name}\n+++ b/{name}\n" in printed.out
    assert "-from modeling.sync_batchnorm.replicate import patch_replication_callback\n" in printed.out
    assert "+from autosyncbn import patch_replication_callback\n" in printed.out
    assert VENDORED + "/" not in printed.out  # the vendored files are not rewritten
    assert "4 file(s) would change; run again with --write" in printed.err


def test_write_rewrites_exactly_the_expected_lines(repo, capsys):
    before = snapshot(repo)
    assert migrate(repo, "--write") == 1
    assert snapshot(repo) == expected_after(before)
    err = capsys.readouterr().err
    assert "Rewrote 4 file(s)." in err
    assert "modeling/aspp.py:6: SyncMaster (from .sync_batchnorm.batchnorm): no autosyncbn equivalent" in err
    assert err.count(".py:") == 1  # nothing else is reported
    # A second run finds nothing more to change and still reports what is left.
    assert migrate(repo, "--write") == 1
    printed = capsys.readouterr()
    assert printed.out == "" and "No import to rewrite." in printed.err and "SyncMaster" in printed.err


def test_delete_vendored_waits_until_nothing_imports_it(repo, capsys):
    assert migrate(repo, "--write", "--delete-vendored") == 1
    assert (repo / VENDORED / "batchnorm.py").is_file()
    assert "Kept the vendored copy" in capsys.readouterr().err


def test_migrated_repository_runs_without_its_vendored_copy(repo, capsys):
    assert migrate(repo, "--write") == 1
    aspp = repo / "modeling" / "aspp.py"
    aspp.write_text(aspp.read_text().replace(ASPP_LEFTOVER, "SyncMaster = None  # the user's own fix\n"))

    result = run_python(repo, "-m", "autosyncbn", "migrate", ".", "--write", "--delete-vendored")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "Deleted modeling/sync_batchnorm" in result.stderr
    assert not (repo / VENDORED).exists()

    result = run_python(repo, "-c", IMPORT_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "migrated model ok" in result.stdout


# (file written into a repository holding only the vendored copy, its source, its source after
# --write or None for unchanged, what is reported or None)
CASES = {
    "top-level module": ("train.py", """\
        import sync_batchnorm

        layer = sync_batchnorm.SynchronizedBatchNorm2d(4)
        """, """\
        import autosyncbn as sync_batchnorm

        layer = sync_batchnorm.SynchronizedBatchNorm2d(4)
        """, None),
    "package from its parent": ("train.py", """\
        from modeling import sync_batchnorm
        model = sync_batchnorm.convert_model(None)
        """, """\
        import autosyncbn as sync_batchnorm
        model = sync_batchnorm.convert_model(None)
        """, None),
    "relative, from a sibling package": ("modeling/backbone/xception.py", """\
        from ..sync_batchnorm.replicate import patch_replication_callback
        """, """\
        from autosyncbn import patch_replication_callback
        """, None),
    "relative, the package itself": ("modeling/decoder.py", """\
        from . import sync_batchnorm as sbn
        layer = sbn.SynchronizedBatchNorm1d(2)
        """, """\
        import autosyncbn as sbn
        layer = sbn.SynchronizedBatchNorm1d(2)
        """, None),
    "submodule and name in one import": ("train.py", """\
        from modeling.sync_batchnorm import batchnorm, DataParallelWithCallback
        layer = batchnorm.SynchronizedBatchNorm3d(2)
        """, """\
        from autosyncbn import DataParallelWithCallback
        import autosyncbn as batchnorm
        layer = batchnorm.SynchronizedBatchNorm3d(2)
        """, None),
    "alias among other imports": ("train.py", """\
        import os, modeling.sync_batchnorm.batchnorm as bn
        layer = bn.SynchronizedBatchNorm2d(2)
        """, """\
        import os, autosyncbn as bn
        layer = bn.SynchronizedBatchNorm2d(2)
        """, None),
    "inside try": ("train.py", """\
        try:
            from sync_batchnorm import SynchronizedBatchNorm2d  # optional
        except ImportError:
            SynchronizedBatchNorm2d = None
        """, """\
        try:
            from autosyncbn import SynchronizedBatchNorm2d  # optional
        except ImportError:
            SynchronizedBatchNorm2d = None
        """, None),
    "a shadowing parameter is not a use": ("train.py", """\
        import modeling.sync_batchnorm as sbn


        def use(sbn):
            return sbn.anything
        """, """\
        import autosyncbn as sbn


        def use(sbn):
            return sbn.anything
        """, None),
    "unrelated imports": ("train.py", """\
        from modeling.deeplab import DeepLab
        from torch.nn.modules.batchnorm import BatchNorm2d
        import batchnorm
        """, None, None),
    "relative import of another folder": ("other/layers.py", """\
        from .sync_batchnorm import SynchronizedBatchNorm2d
        """, None, None),
    "split on one line": ("train.py", """\
        from modeling.sync_batchnorm.batchnorm import SynchronizedBatchNorm2d, _SynchronizedBatchNorm  # layers
        """, """\
        from autosyncbn import SynchronizedBatchNorm2d  # layers
        from modeling.sync_batchnorm.batchnorm import _SynchronizedBatchNorm
        """, "train.py:1: _SynchronizedBatchNorm (from modeling.sync_batchnorm.batchnorm)"),
    "test helper": ("tests/test_bn.py", """\
        from modeling.sync_batchnorm.unittest import TorchTestCase
        """, None, "tests/test_bn.py:1: TorchTestCase"),
    "fully qualified uses": ("train.py", """\
        import modeling.sync_batchnorm.batchnorm

        layer = modeling.sync_batchnorm.batchnorm.SynchronizedBatchNorm2d(4)
        """, None, "train.py:1: import modeling.sync_batchnorm.batchnorm binds modeling"),
    "star import": ("train.py", """\
        from modeling.sync_batchnorm import *
        """, None, "train.py:1: from modeling.sync_batchnorm import *"),
    "module alias with a name autosyncbn lacks": ("train.py", """\
        import modeling.sync_batchnorm as sbn

        master = sbn.SyncMaster
        """, None, "train.py:3: sbn.SyncMaster: no autosyncbn equivalent"),
    "module object passed around": ("train.py", """\
        from modeling.sync_batchnorm import comm
        print(comm)
        """, None, "train.py:2: comm is used other than as comm.NAME"),
    "python 2": ("legacy.py", """\
        from sync_batchnorm import SynchronizedBatchNorm2d
        print "python 2"
        """, None, "legacy.py: libcst cannot parse this file"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_import_shapes(vendored_only, capsys, name):
    path, source, expected, issue = CASES[name]
    file = vendored_only / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(textwrap.dedent(source))
    assert migrate(vendored_only, "--write") == (0 if issue is None else 1)
    assert file.read_text() == textwrap.dedent(expected or source)
    err = capsys.readouterr().err
    if issue is not None:
        assert issue in err
    else:
        assert "Left for you" not in err


def lookalike(root: Path) -> None:
    """A folder with the classic file names but not the classic package."""
    (root / "ops").mkdir()
    for name in ("batchnorm.py", "comm.py", "replicate.py"):
        (root / "ops" / name).write_text("class BatchNorm2d:\n    pass\n")
    (root / "train.py").write_text("from ops.batchnorm import BatchNorm2d\n")


@pytest.mark.parametrize("make", [lambda root: (root / "train.py").write_text("import torch\n"), lookalike],
                         ids=["plain repository", "lookalike folder"])
def test_nothing_to_migrate(tmp_path, capsys, make):
    make(tmp_path)
    before = snapshot(tmp_path)
    assert migrate(tmp_path, "--write", "--delete-vendored") == 0
    assert snapshot(tmp_path) == before
    assert "No vendored sync_batchnorm found" in capsys.readouterr().err


def test_unused_vendored_copy_is_deleted(vendored_only, capsys):
    assert migrate(vendored_only, "--write", "--delete-vendored") == 0
    assert not (vendored_only / VENDORED).exists() and (vendored_only / "modeling" / "__init__.py").exists()
    assert "No import to rewrite." in capsys.readouterr().err


def test_delete_vendored_needs_write(repo, capsys):
    assert migrate(repo, "--delete-vendored") == 2
    assert (repo / VENDORED).is_dir()
    assert "--delete-vendored only works together with --write" in capsys.readouterr().err


def test_without_libcst_says_how_to_install_it(repo, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "libcst", None)  # `import libcst` now raises ImportError
    assert migrate(repo) == 2
    assert 'pip install "autosyncbn[migrate]"' in capsys.readouterr().err
