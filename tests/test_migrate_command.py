"""``python -m autosyncbn migrate``: a repository that vendors sync_batchnorm moves to autosyncbn.

``fixtures/classic_repo`` is a small repository in the usual shape (a DeepLab
model with ``modeling/sync_batchnorm/`` vendored); each test migrates a copy.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autosyncbn.tools import migrate as migrate_module
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
    assert sorted(os.listdir(vendored_only / "modeling")) == ["__init__.py"]  # no hidden copy left either
    assert "No import to rewrite." in capsys.readouterr().err


def test_delete_vendored_needs_write(repo, capsys):
    assert migrate(repo, "--delete-vendored") == 2
    assert (repo / VENDORED).is_dir()
    assert "--delete-vendored only works together with --write" in capsys.readouterr().err


def test_without_libcst_says_how_to_install_it(repo, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "libcst", None)  # `import libcst` now raises ImportError
    assert migrate(repo) == 2
    assert 'pip install "autosyncbn[migrate]"' in capsys.readouterr().err


# --write is all or nothing. The tests run as root, which chmod does not stop, so a denied
# permission is simulated (os.access says no, as it would to a user) and failures while
# applying are injected into os.fsync / os.replace / os.rename, or made real by changing
# a file between the checks and the writes.

IMPORTER = "from modeling.sync_batchnorm import SynchronizedBatchNorm2d\n"


def state(root: Path) -> "dict[str, tuple[object, int]]":
    """Every file's bytes and every entry's permission bits, temporaries and hidden folders included."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None,
                                              stat.S_IMODE(p.lstat().st_mode))
            for p in sorted(root.rglob("*"))}


def refusal(capsys) -> str:
    """The one line the command printed, checking that it printed nothing else."""
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1 and "Traceback" not in printed.err, printed
    return printed.err.rstrip("\n")


@pytest.fixture
def deny(monkeypatch):
    """``deny(path)``: chmod it read-only and make os.access refuse writing it, as for a user who is not root."""
    modes = {}

    def deny(path: Path) -> None:
        modes[path] = path.stat().st_mode
        path.chmod(stat.S_IMODE(modes[path]) & ~0o222)
        denied.add(os.path.realpath(path))

    denied: "set[str]" = set()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.realpath(path) in denied:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    yield deny
    for path, mode in modes.items():
        if path.exists():
            path.chmod(mode)


@pytest.fixture
def importing(vendored_only: Path) -> Path:
    """The vendored copy and a train.py importing from it: --delete-vendored deletes the copy."""
    (vendored_only / "train.py").write_text(IMPORTER)
    return vendored_only


@pytest.mark.timeout(60)
@pytest.mark.parametrize("denied, message", [
    ("modeling/aspp.py", "cannot write modeling/aspp.py: Permission denied"),
    ("modeling/backbone", "cannot write modeling/backbone/resnet.py: Permission denied (folder modeling/backbone)"),
], ids=["read-only file", "read-only folder"])
def test_write_refuses_a_file_it_cannot_write(repo, capsys, deny, denied, message):
    deny(repo / denied)
    before = state(repo)
    assert migrate(repo, "--write") == 1
    assert state(repo) == before
    assert refusal(capsys) == f"autosyncbn migrate: {message}; nothing was changed"


@pytest.mark.timeout(60)
def test_write_refuses_a_file_that_became_a_folder(repo, capsys, monkeypatch):
    """A real failure under root too: aspp.py turns into a folder after it was read."""
    read = migrate_module._rewrite_all

    def read_then_replace_aspp(*args):
        result = read(*args)
        (repo / "modeling" / "aspp.py").unlink()
        (repo / "modeling" / "aspp.py").mkdir()
        return result

    monkeypatch.setattr(migrate_module, "_rewrite_all", read_then_replace_aspp)
    before = state(repo)
    assert migrate(repo, "--write") == 1
    after = state(repo)
    assert after.pop("modeling/aspp.py")[0] is None  # still the folder put there
    before.pop("modeling/aspp.py")
    assert after == before
    assert refusal(capsys) == "autosyncbn migrate: cannot write modeling/aspp.py: Is a directory; nothing was changed"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("denied", ["modeling", "modeling/sync_batchnorm"], ids=["its parent", "itself"])
def test_delete_vendored_refuses_a_copy_it_cannot_delete(importing, capsys, deny, denied):
    deny(importing / denied)
    before = state(importing)
    assert migrate(importing, "--write", "--delete-vendored") == 1
    assert state(importing) == before  # train.py is not rewritten either
    assert refusal(capsys) == (f"autosyncbn migrate: cannot delete {VENDORED}: Permission denied "
                               f"(folder {denied}); nothing was changed")


def fail(name: str, when, error: OSError):
    """``os.<name>`` that raises ``error`` on the call for which ``when(number, *args)`` is true."""
    real, calls = getattr(os, name), []

    def failing(*args, **kwargs):
        calls.append(args)
        if when(len(calls), *args):
            raise error
        return real(*args, **kwargs)

    return name, failing, calls


def is_file(path: str):
    """``when`` for a call whose last path argument is ``path`` under the repository."""
    return lambda root: lambda number, *args: os.path.realpath(args[-1]) == os.path.realpath(root / path)


DENIED = PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def replacing_train_once_moved_aside(root: Path):
    """``when`` for replacing train.py, checking the vendored copy was moved aside before it."""
    def when(number, source, target):
        if os.path.realpath(target) != os.path.realpath(root / "train.py"):
            return False
        assert not (root / VENDORED).exists()  # an AssertionError would come out of migrate()
        return True
    return when


# (repository fixture, more arguments, os function and when it fails, calls made, message)
MIDWAY = {
    # fsync runs once per temporary, two per file (new, and a copy of the old): the 6th is
    # deeplab.py's second, after train.py, aspp.py and half of deeplab.py are written.
    "disk full while writing the temporaries": (
        "repo", (), lambda root: fail("fsync", lambda number, *args: number == 6,
                                      OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
        6, "cannot write modeling/deeplab.py: No space left on device"),
    # train.py and aspp.py are replaced already: two more replaces put them back.
    "a replace fails after two files were replaced": (
        "repo", (), lambda root: fail("replace", is_file("modeling/deeplab.py")(root), DENIED),
        3 + 2, "cannot write modeling/deeplab.py: Permission denied"),
    # The copy was moved aside already: a rename brings it back.
    "a replace fails after the copy was moved aside": (
        "importing", ("--delete-vendored",),
        lambda root: fail("replace", replacing_train_once_moved_aside(root), DENIED),
        1, "cannot write train.py: Permission denied"),
    "the copy cannot be moved aside": (
        "importing", ("--delete-vendored",),
        lambda root: fail("rename", lambda number, *args: os.path.realpath(args[0]) == str(root / VENDORED), DENIED),
        1, f"cannot delete {VENDORED}: Permission denied"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(MIDWAY))
def test_failure_while_applying_changes_nothing(request, capsys, monkeypatch, case):
    kind, args, failure, calls_made, message = MIDWAY[case]
    root = request.getfixturevalue(kind)
    before = state(root)
    name, failing, calls = failure(root)
    with monkeypatch.context() as patch:
        patch.setattr(os, name, failing)
        assert migrate(root, "--write", *args) == 1
    assert len(calls) == calls_made  # it failed where the case says, and the undo ran
    assert state(root) == before  # originals back in place, no temporary left behind
    assert refusal(capsys) == f"autosyncbn migrate: {message}; nothing was changed"


@pytest.mark.timeout(60)
def test_file_changed_during_migration_is_not_overwritten(repo, capsys, monkeypatch):
    """A real failure under root too: the user saves resnet.py between the checks and the writes."""
    check = migrate_module._check
    resnet = repo / "modeling" / "backbone" / "resnet.py"

    def check_then_edit(*args):
        check(*args)
        with resnet.open("a") as stream:
            stream.write("# saved meanwhile\n")

    monkeypatch.setattr(migrate_module, "_check", check_then_edit)
    before = state(repo)
    assert migrate(repo, "--write") == 1
    edited = resnet.read_bytes()
    assert edited.endswith(b"# saved meanwhile\n")
    assert state(repo) == {**before, "modeling/backbone/resnet.py": (edited, before["modeling/backbone/resnet.py"][1])}
    assert refusal(capsys) == ("autosyncbn migrate: cannot write modeling/backbone/resnet.py: "
                               "it changed while being migrated; nothing was changed")


@pytest.mark.timeout(60)
def test_write_keeps_permission_bits_and_leaves_no_temporaries(repo, capsys):
    (repo / "train.py").chmod(0o755)
    (repo / "modeling" / "aspp.py").chmod(0o600)
    before = state(repo)
    assert migrate(repo, "--write") == 1  # SyncMaster is left for the user
    contents = expected_after(snapshot_of(before))
    assert state(repo) == {name: (contents.get(name), mode) for name, (_, mode) in before.items()}
    assert "Rewrote 4 file(s)." in capsys.readouterr().err


def snapshot_of(entries: "dict[str, tuple[object, int]]") -> "dict[str, bytes]":
    return {name: data for name, (data, _) in entries.items() if data is not None}


# --delete-vendored is part of the same transaction: a deletion that fails halfway puts back
# the files it removed already, the rewritten imports and the copy under its own name.

def named(pattern: str):
    """``when`` for a call whose first path argument's last name matches ``pattern`` (full path or not)."""
    return lambda number, *args: fnmatch.fnmatch(os.path.basename(os.fspath(args[0])), pattern)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, when, error, message", [
    # Deleted content first, in reverse order: unittest.py, replicate.py and link.py are gone already.
    ("unlink", named("comm.py"), OSError(errno.EPERM, os.strerror(errno.EPERM)),
     f"cannot delete {VENDORED}/comm.py: Operation not permitted"),
    # Every file and __pycache__ are gone already; the copy, moved aside, is the last to go.
    ("rmdir", named("*.autosyncbn-deleted"), OSError(errno.EBUSY, os.strerror(errno.EBUSY)),
     f"cannot delete {VENDORED}: Device or resource busy"),
], ids=["a file", "the folder itself"])
def test_delete_vendored_failing_halfway_changes_nothing(importing, capsys, monkeypatch, name, when, error, message):
    copy = importing / VENDORED
    (copy / "__pycache__").mkdir(mode=0o750)
    (copy / "__pycache__" / "batchnorm.cpython-311.pyc").write_bytes(b"\x00compiled")
    (copy / "comm.py").chmod(0o600)
    (copy / "link.py").symlink_to("comm.py")
    before = state(importing)
    times = {p: p.lstat().st_mtime_ns for p in copy.rglob("*") if p.is_file() and not p.is_symlink()}
    name, failing, calls = fail(name, when, error)
    with monkeypatch.context() as patch:
        patch.setattr(os, name, failing)
        assert migrate(importing, "--write", "--delete-vendored") == 1
    assert any(when(0, *args) for args in calls)  # it got as far as deleting
    assert state(importing) == before  # train.py as it was, every file of the copy back, nothing hidden left
    assert {p: p.lstat().st_mtime_ns for p in times} == times
    assert refusal(capsys) == f"autosyncbn migrate: {message}; nothing was changed"


@pytest.mark.timeout(60)
def test_delete_vendored_refuses_what_it_could_not_put_back(importing, capsys):
    """A real failure under root too: a named pipe in the copy could not be recreated if the deletion failed."""
    os.mkfifo(importing / VENDORED / "pipe")
    before = state(importing)
    assert migrate(importing, "--write", "--delete-vendored") == 1
    assert state(importing) == before
    assert refusal(capsys) == (f"autosyncbn migrate: cannot delete {VENDORED}/pipe: not a file, folder or symlink; "
                               f"nothing was changed")


# Nothing outside PATH is ever changed: a symlink that leads out of it is skipped, one line each.

@pytest.mark.timeout(60)
def test_symlink_to_a_file_outside_is_left_for_the_user(importing, tmp_path, capsys):
    """shared.py is not the repository's to change; it still imports the copy, so the copy stays too."""
    shared = tmp_path / "shared.py"
    shared.write_text(IMPORTER)
    (importing / "train.py").unlink()
    (importing / "train.py").symlink_to(shared)
    before = state(importing)
    assert migrate(importing, "--write", "--delete-vendored") == 1
    assert shared.read_text() == IMPORTER and sorted(os.listdir(tmp_path)) == ["repo", "shared.py"]
    assert state(importing) == before
    err = capsys.readouterr().err
    assert (f"  train.py: a symlink to {shared}, outside the folder migrated, and it mentions the vendored "
            f"copy: not rewritten, migrate its imports by hand\n") in err
    assert err.count("train.py") == 1 and "Kept the vendored copy" in err


@pytest.mark.timeout(60)
def test_symlinks_to_outside_are_skipped_with_one_line_each(importing, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "helpers.py").write_text("import os\n")
    (elsewhere / "layers.py").write_text(IMPORTER)  # behind a linked folder: not walked
    (importing / "helpers.py").symlink_to(elsewhere / "helpers.py")
    (importing / "ext").symlink_to(elsewhere)
    outside = snapshot(elsewhere)
    assert migrate(importing, "--write") == 0
    assert snapshot(elsewhere) == outside
    assert (importing / "train.py").read_text() == "from autosyncbn import SynchronizedBatchNorm2d\n"
    printed = capsys.readouterr()
    skipped = [line for line in printed.err.splitlines() if line.startswith("Skipped")]
    assert skipped == [f"Skipped ext: a symlink to {elsewhere}, outside the folder migrated",
                       f"Skipped helpers.py: a symlink to {elsewhere / 'helpers.py'}, outside the folder migrated"]
    assert "--- a/train.py" in printed.out and "ext/" not in printed.out and "Rewrote 1 file(s)." in printed.err


@pytest.mark.timeout(60)
def test_symlinks_inside_rewrite_their_target_once(importing, capsys):
    """alias.py is train.py under another name: one diff, one write. tools.py's target is in a hidden
    folder, which is not walked: it is rewritten through the link. A linked folder is not walked twice."""
    (importing / "alias.py").symlink_to("train.py")
    (importing / ".shared").mkdir()
    (importing / ".shared" / "real.py").write_text(IMPORTER)
    (importing / "tools.py").symlink_to(".shared/real.py")
    (importing / "models").symlink_to("modeling", target_is_directory=True)
    (importing / "modeling" / "decoder.py").write_text(IMPORTER)
    assert migrate(importing, "--write") == 0
    printed = capsys.readouterr()
    assert [line for line in printed.out.splitlines() if line.startswith("---")] == [
        "--- a/tools.py", "--- a/train.py", "--- a/modeling/decoder.py"]  # no alias.py
    assert "Rewrote 3 file(s)." in printed.err and "Skipped" not in printed.err
    migrated = "from autosyncbn import SynchronizedBatchNorm2d\n"
    for name in ("train.py", ".shared/real.py", "modeling/decoder.py"):
        assert (importing / name).read_text() == migrated and not (importing / name).is_symlink()
    assert (importing / "alias.py").is_symlink() and (importing / "tools.py").is_symlink()


@pytest.mark.timeout(60)
def test_symlink_into_the_vendored_copy_is_left_for_the_user(importing, capsys):
    """Deleting the copy would leave modeling/bn.py dangling."""
    (importing / "modeling" / "bn.py").symlink_to("sync_batchnorm/batchnorm.py")
    batchnorm = (importing / VENDORED / "batchnorm.py").read_bytes()
    assert migrate(importing, "--write", "--delete-vendored") == 1
    assert (importing / VENDORED / "batchnorm.py").read_bytes() == batchnorm
    err = capsys.readouterr().err
    assert (f"  modeling/bn.py: a symlink to {VENDORED}/batchnorm.py, inside the vendored copy: "
            f"not rewritten, and deleting the copy would break it\n") in err
    assert "Kept the vendored copy" in err


@pytest.mark.timeout(60)
def test_write_refuses_a_symlink_retargeted_outside(vendored_only, tmp_path, capsys, monkeypatch):
    """A real failure under root too: train.py is pointed outside PATH after it was read."""
    (vendored_only / ".shared").mkdir()  # not walked: train.py is rewritten through the link
    (vendored_only / ".shared" / "real.py").write_text(IMPORTER)
    (vendored_only / "train.py").symlink_to(".shared/real.py")
    shared = tmp_path / "shared.py"
    shared.write_text(IMPORTER)
    read = migrate_module._rewrite_all

    def read_then_retarget(*args):
        result = read(*args)
        (vendored_only / "train.py").unlink()
        (vendored_only / "train.py").symlink_to(shared)
        return result

    monkeypatch.setattr(migrate_module, "_rewrite_all", read_then_retarget)
    assert migrate(vendored_only, "--write") == 1
    assert shared.read_text() == IMPORTER and sorted(os.listdir(tmp_path)) == ["repo", "shared.py"]
    assert (vendored_only / ".shared" / "real.py").read_text() == IMPORTER
    assert refusal(capsys) == (f"autosyncbn migrate: cannot write train.py: a symlink to {shared}, "
                               f"outside the folder migrated; nothing was changed")
