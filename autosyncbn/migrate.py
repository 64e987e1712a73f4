"""``python -m autosyncbn migrate PATH``: move a repository off its vendored copy of ``sync_batchnorm``.

Many repositories carry the classic package as a folder (``modeling/sync_batchnorm/``
with ``batchnorm.py``, ``replicate.py``, ``comm.py``, ...). This command finds
such folders under PATH and rewrites every import of them, in the ``.py``
files under PATH, into an import of ``autosyncbn``. By default it only prints
the unified diff; ``--write`` applies it; ``--write --delete-vendored`` also
deletes the folders once nothing imports them any more.

What is rewritten:

* ``from <vendored>[.submodule] import NAME [as X]`` -> ``from autosyncbn import NAME [as X]``
  for every NAME autosyncbn has (``autosyncbn.__all__``).
* A module object: ``import <vendored> as sbn``, ``from modeling import sync_batchnorm``,
  ``from .sync_batchnorm import batchnorm``, a top-level ``import sync_batchnorm``
  -> ``import autosyncbn as <the same name>``, but only when libcst's scope
  analysis shows every use of that name is ``name.NAME`` with NAME in autosyncbn.
* ``<vendored>`` is an absolute dotted name that starts with the folder's path
  below PATH or any tail of it (``sync_batchnorm.batchnorm`` matches
  ``modeling/sync_batchnorm`` too, for code run with ``modeling/`` on sys.path),
  or a relative import resolved against the importing file's own folder.
  Files inside the vendored folders are not rewritten.

What is left as it is and reported (``file:line: why``), never guessed:

* Names with no equivalent (``SyncMaster``, ``TorchTestCase``, ...). An import
  that mixes them with migratable names is split: the migratable names move to
  a ``from autosyncbn import ...`` line and the rest stay on the original
  import, so what is left to do is exactly the lines still pointing at the
  vendored copy, and the migrated names work already.
* ``import a.sync_batchnorm.batchnorm`` without ``as`` (it binds ``a``; the uses
  spell the full path), star imports, module objects used otherwise, and
  files libcst cannot parse that mention a vendored folder's name.

Exit status: 0 when everything found was migrated (or there was nothing to
migrate), 1 when something was left for the user, 2 when the command could
not run (libcst missing, PATH not a folder, ``--delete-vendored`` without
``--write``). The diff goes to stdout alone, so ``> migrate.patch`` is a clean
patch; messages go to stderr.

Not seen: code outside PATH, ``importlib``/``__import__`` with a string, and
names re-exported through another package (``from lib.nn import
SynchronizedBatchNorm2d`` where ``lib/nn/__init__.py`` star-imports the copy:
that star import is reported). This file finds folders and runs the command;
the libcst rewrite of one file is ``migrate_imports.py``, imported only once
libcst is known to be installed, so the other commands never need it.
"""
from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:  # libcst is optional: migrate_imports is imported once main() knows it is there
    from .migrate_imports import Locate, Rewrite

_MARKER = "class SynchronizedBatchNorm2d"  # in batchnorm.py: file names alone could be anyone's
_INSTALL_HINT = 'autosyncbn migrate needs libcst: pip install "autosyncbn[migrate]"'


def _is_skipped(folder: Path) -> bool:
    """Folders that are not the repository's own code: VCS data, caches, virtual environments."""
    return folder.name.startswith(".") or folder.name == "__pycache__" or (folder / "pyvenv.cfg").exists()


def _folders(root: Path) -> Iterator[Path]:
    """``root`` and every folder below it, in a stable order, the skipped ones left out."""
    for current, subfolders, _ in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not _is_skipped(Path(current, name)))
        yield Path(current)


def is_vendored_copy(folder: Path) -> bool:
    """The classic package: its batchnorm.py with the layer class, and replicate.py or comm.py."""
    batchnorm = folder / "batchnorm.py"
    if not batchnorm.is_file() or not ((folder / "replicate.py").is_file() or (folder / "comm.py").is_file()):
        return False
    return _MARKER in batchnorm.read_text(encoding="utf-8", errors="replace")


def find_vendored(root: Path) -> "list[Path]":
    """Every vendored copy under ``root`` (outermost only: a copy inside a copy is part of it)."""
    found: "list[Path]" = []
    for folder in _folders(root):
        if is_vendored_copy(folder) and not any(copy in folder.parents for copy in found):
            found.append(folder)
    return found


def python_files(root: Path, vendored: "list[Path]") -> Iterator[Path]:
    """The ``.py`` files to rewrite: everything under ``root`` but the vendored copies themselves."""
    for folder in _folders(root):
        if folder in vendored or any(copy in folder.parents for copy in vendored):
            continue
        yield from sorted(file for file in folder.glob("*.py") if file.is_file())


def locator(root: Path, vendored: "list[Path]", file: Path) -> "Locate":
    """Where an import written in ``file`` points inside a vendored copy, if it does."""
    tails = [(copy, copy.relative_to(root).parts or (copy.name,)) for copy in vendored]

    def locate(level: int, parts: "tuple[str, ...]") -> Optional[Path]:
        if level:  # relative: from the file's own package folder, one folder up per extra dot
            package = file.parent
            for _ in range(level - 1):
                package = package.parent
            target = package.joinpath(*parts)
            return target if any(target == copy or copy in target.parents for copy in vendored) else None
        for copy, folder_parts in tails:
            for start in range(len(folder_parts)):
                tail = folder_parts[start:]
                if parts[:len(tail)] == tail:
                    return copy.joinpath(*parts[len(tail):])
        return None

    return locate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="the repository (or folder) to migrate")
    parser.add_argument("--write", action="store_true", help="apply the changes (default: print the diff only)")
    parser.add_argument("--delete-vendored", action="store_true",
                        help="with --write: delete the vendored copies once nothing imports them")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _rewrite_all(root: Path, vendored: "list[Path]") -> "tuple[dict[Path, Rewrite], list[str]]":
    """Each changed file's rewrite, and every ``file:line: why`` left for the user."""
    from .migrate_imports import ParseError, rewrite_imports

    changed: "dict[Path, Rewrite]" = {}
    issues: "list[str]" = []
    for file in python_files(root, vendored):
        name = file.relative_to(root).as_posix()
        source = file.read_bytes()
        try:
            rewrite = rewrite_imports(source, locator(root, vendored, file))
        except (ParseError, SyntaxError, ValueError):  # Python 2, a syntax error, an unknown encoding
            if any(copy.name.encode() in source for copy in vendored):
                issues.append(f"{name}: libcst cannot parse this file and it mentions the "
                              f"vendored copy: migrate its imports by hand")
            continue
        issues.extend(f"{name}:{issue.line}: {issue.message}" for issue in rewrite.issues)
        if rewrite.changed:
            changed[file] = rewrite
    return changed, issues


def _print_diff(root: Path, changed: "dict[Path, Rewrite]") -> None:
    for file, rewrite in changed.items():
        name = file.relative_to(root).as_posix()
        for line in difflib.unified_diff(rewrite.old.splitlines(keepends=True),
                                         rewrite.new.splitlines(keepends=True),
                                         fromfile=f"a/{name}", tofile=f"b/{name}"):
            sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")


def main(args: argparse.Namespace) -> int:
    root = Path(args.path).resolve()
    if args.delete_vendored and not args.write:
        _say("--delete-vendored only works together with --write")
        return 2
    if not root.is_dir():
        _say(f"{args.path} is not a folder")
        return 2
    try:
        import libcst  # noqa: F401 -- optional, only this command needs it
    except ImportError:
        _say(_INSTALL_HINT)
        return 2

    vendored = find_vendored(root)
    if not vendored:
        _say(f"No vendored sync_batchnorm found under {args.path}: nothing to migrate.")
        return 0
    for copy in vendored:
        _say(f"Vendored sync_batchnorm: {copy.relative_to(root).as_posix()}")
    changed, issues = _rewrite_all(root, vendored)
    _print_diff(root, changed)

    if not changed:
        _say("No import to rewrite.")
    elif args.write:
        for file, rewrite in changed.items():
            file.write_bytes(rewrite.new_bytes)
        _say(f"Rewrote {len(changed)} file(s).")
    else:
        _say(f"{len(changed)} file(s) would change; run again with --write to apply the diff above.")

    if issues:
        _say("Left for you to handle (these still import the vendored copy):")
        for issue in issues:
            _say(f"  {issue}")
    if args.delete_vendored:
        if issues:
            _say("Kept the vendored copy: the imports above still use it.")
        else:
            for copy in vendored:
                shutil.rmtree(copy)
                _say(f"Deleted {copy.relative_to(root).as_posix()}")
    return 1 if issues else 0
