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

Symlinks: nothing outside PATH is ever changed. A symlink under PATH to a
file or folder outside it is skipped, one line each (``Skipped x.py: a
symlink to /elsewhere/x.py, outside the folder migrated``); a skipped file
that mentions the vendored copy is left for the user, as it still imports it.
A symlink to a file inside PATH is one more name for it: the file is
rewritten once (under its own name when the walk reaches it), the link stays.
A symlink into a vendored copy is left for the user, like the copy's files.

``--write`` is all or nothing. First every file to rewrite must be a readable,
writable file in a writable folder, and every folder to delete must be
deletable (its parent and each folder in it writable) and is read into
memory (a deletion cannot be undone, so what it removes is kept to be
recreated). Then each new file is written to a temporary beside it, with the
old file's permission bits, as is a copy of the old content; only then are
the vendored folders renamed aside, the temporaries renamed over the files
(``os.replace``) and the folders deleted, each step undone if a later one
fails. A file that changed since it was read stops it too. On any failure
nothing is changed and one line says which file and why:
``autosyncbn migrate: cannot write modeling/aspp.py: Permission denied; nothing was changed``.

Exit status: 0 when everything found was migrated (or there was nothing to
migrate), 1 when something was left for the user or ``--write`` was refused,
2 when the command could not run (libcst missing, PATH not a folder,
``--delete-vendored`` without ``--write``). The diff goes to stdout alone, so
``> migrate.patch`` is a clean patch; messages go to stderr.

Not seen: code outside PATH, ``importlib``/``__import__`` with a string, and
names re-exported through another package (``from lib.nn import
SynchronizedBatchNorm2d`` where ``lib/nn/__init__.py`` star-imports the copy:
that star import is reported). This file finds folders and runs the command;
the libcst rewrite of one file is ``migrate_imports.py``, imported only once
libcst is known to be installed, so the other commands never need it.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import functools
import os
import stat
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

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


def _inside(folder: Path, path: Path) -> bool:
    """``path`` is ``folder`` or below it (both absolute and resolved: no symlink followed here)."""
    return path == folder or folder in path.parents


def _real(path: Path) -> Path:
    """Where ``path`` really is, every symlink followed."""
    return Path(os.path.realpath(path))


@dataclass
class Sources:
    """What the command may read under ``root``, and the symlinks it leaves alone."""

    files: "list[Path]" = field(default_factory=list)  # to rewrite: each real file once, under root
    outside: "list[Path]" = field(default_factory=list)  # symlinks (files, folders) that lead out of root
    into_copy: "list[Path]" = field(default_factory=list)  # ``.py`` symlinks to a file of a vendored copy


def python_files(root: Path, vendored: "list[Path]") -> Sources:
    """The ``.py`` files to rewrite: everything under ``root`` but the vendored copies themselves.

    Nothing outside ``root`` is ever written, so a symlink leading out of it (a
    file, or a folder, which os.walk does not enter anyway) is listed in
    ``outside`` instead. A symlink to a file inside ``root`` is one more name for
    it: the file is rewritten once, under its own name when the walk reaches
    it too, else under the first link's name (e.g. a target in a hidden folder).
    A link into a vendored copy is left like the copy's own files.
    """
    found = Sources()
    linked: "list[tuple[Path, Path]]" = []  # (name under root, real file), in walk order
    for folder in _folders(root):
        if any(_inside(copy, folder) for copy in vendored):
            continue
        with os.scandir(folder) as entries:
            found.outside.extend(sorted(
                folder / entry.name for entry in entries
                if entry.is_symlink() and entry.is_dir() and not _is_skipped(folder / entry.name)
                and not _inside(root, _real(folder / entry.name))))
        for file in sorted(folder.glob("*.py")):
            real = _real(file)
            if not real.is_file():
                continue
            if not _inside(root, real):
                found.outside.append(file)
            elif any(_inside(copy, real) for copy in vendored):
                found.into_copy.append(file)
            else:
                linked.append((file, real))
    walked = {real for file, real in linked if file == real}
    for file, real in linked:
        if file == real or real not in walked:
            found.files.append(file)
            walked.add(real)  # a second link to the same file is skipped
    return found


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


class Refused(Exception):
    """Why the migration was not applied; ``left`` names what an undo could not put back."""

    def __init__(self, message: str, left: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message, self.left = message, list(left)

    def __str__(self) -> str:
        if not self.left:
            return f"{self.message}; nothing was changed"
        return f"{self.message}; changed and could not be put back: {', '.join(self.left)}"


@contextlib.contextmanager
def _refusing(what: str) -> Iterator[None]:
    """An OSError inside becomes ``Refused("<what>: <reason>")``."""
    try:
        yield
    except OSError as error:
        raise Refused(f"{what}: {error.strerror or error}") from error


def _name(root: Path, path: Path) -> str:
    """``path`` as the messages show it: relative to PATH when inside it."""
    return path.relative_to(root).as_posix() if _inside(root, path) else str(path)


def _rewrite_all(root: Path, vendored: "list[Path]"
                 ) -> "tuple[dict[Path, Rewrite], list[str], list[str]]":
    """Each changed file's rewrite, every ``file:line: why`` left for the user, and each symlink skipped."""
    from .migrate_imports import ParseError, rewrite_imports

    def read(file: Path) -> bytes:
        with _refusing(f"cannot read {_name(root, file)}"):
            return file.read_bytes()

    def mentions_a_copy(source: bytes) -> bool:
        return any(copy.name.encode() in source for copy in vendored)

    sources = python_files(root, vendored)
    changed: "dict[Path, Rewrite]" = {}
    issues: "list[str]" = []
    skipped: "list[str]" = []
    for link in sources.outside:  # read for the warning only: it is not part of PATH
        name, target = _name(root, link), os.path.realpath(link)
        if link.is_file() and mentions_a_copy(read(link)):
            issues.append(f"{name}: a symlink to {target}, outside the folder migrated, and it mentions "
                          f"the vendored copy: not rewritten, migrate its imports by hand")
        else:
            skipped.append(f"Skipped {name}: a symlink to {target}, outside the folder migrated")
    for link in sources.into_copy:
        issues.append(f"{_name(root, link)}: a symlink to {_name(root, _real(link))}, inside the vendored "
                      f"copy: not rewritten, and deleting the copy would break it")
    for file in sources.files:
        name, source = _name(root, file), read(file)
        try:
            rewrite = rewrite_imports(source, locator(root, vendored, file))
        except (ParseError, SyntaxError, ValueError):  # Python 2, a syntax error, an unknown encoding
            if mentions_a_copy(source):
                issues.append(f"{name}: libcst cannot parse this file and it mentions the "
                              f"vendored copy: migrate its imports by hand")
            continue
        issues.extend(f"{name}:{issue.line}: {issue.message}" for issue in rewrite.issues)
        if rewrite.changed:
            changed[file] = rewrite
    return changed, issues, skipped


def _denied(path: Path) -> str:
    """Why ``os.access`` refused ``path``: a read-only file system, or its permissions."""
    with contextlib.suppress(OSError, AttributeError):  # statvfs is POSIX only
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    return os.strerror(errno.EACCES)


def _check(root: Path, changed: "dict[Path, Rewrite]", doomed: "list[Path]") -> None:
    """Refuse before anything is written: each file to rewrite inside ``root``, readable and writable
    in a writable folder; each folder to delete in a writable parent, and it and its subfolders writable."""
    for file in changed:
        name, target = _name(root, file), _real(file)  # a symlink: its target is rewritten
        if not _inside(root, target):  # retargeted since it was read
            raise Refused(f"cannot write {name}: a symlink to {target}, outside the folder migrated")
        if not target.is_file():
            raise Refused(f"cannot write {name}: {os.strerror(errno.EISDIR if target.is_dir() else errno.ENOENT)}")
        if not os.access(target, os.R_OK | os.W_OK):
            raise Refused(f"cannot write {name}: {_denied(target)}")
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise Refused(f"cannot write {name}: {_denied(target.parent)} "
                          f"(folder {_name(root, target.parent)})")
    for copy in doomed:
        name = _name(root, copy)

        def refuse(error: OSError, name: str = name) -> None:  # this iteration's name (B023)
            raise Refused(f"cannot delete {name}: {error.strerror or error}")

        for folder in [copy.parent] + [Path(current) for current, _, _ in os.walk(copy, onerror=refuse)]:
            access = os.W_OK | os.X_OK | (os.R_OK if folder != copy.parent else 0)
            if not os.access(folder, access):
                raise Refused(f"cannot delete {name}: {_denied(folder)} (folder {_name(root, folder)})")


def _temporary(folder: Path, data: bytes, like: os.stat_result) -> Path:
    """A new hidden file in ``folder`` holding ``data``, with the owner and permission bits of ``like``."""
    handle, path = tempfile.mkstemp(dir=folder, prefix=".autosyncbn-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        mine = os.stat(path)
        if hasattr(os, "chown") and (mine.st_uid, mine.st_gid) != (like.st_uid, like.st_gid):
            with contextlib.suppress(PermissionError):  # only root may give a file away: else it is ours
                os.chown(path, like.st_uid, like.st_gid)
        os.chmod(path, stat.S_IMODE(like.st_mode))  # after chown, which may clear set-id bits
    except BaseException:
        os.unlink(path)
        raise
    return Path(path)


@dataclass
class _Staged:
    """One file ready to be replaced: its new content and a copy of its old one wait beside it."""

    name: str  # as the messages show it
    target: Path  # the real file (a symlink's target)
    old: bytes  # as read: it must still be there when replaced
    new_file: Path
    backup: Path  # renamed back over ``target`` to undo


def _stage(root: Path, file: Path, rewrite: "Rewrite") -> _Staged:
    """Write ``file``'s two temporaries, or raise Refused and leave none."""
    name, target = _name(root, file), _real(file)
    with _refusing(f"cannot write {name}"):
        like = os.stat(target)
        new_file = _temporary(target.parent, rewrite.new_bytes, like)
        try:
            backup = _temporary(target.parent, rewrite.old_bytes, like)
        except BaseException:
            new_file.unlink()
            raise
    return _Staged(name, target, rewrite.old_bytes, new_file, backup)


@dataclass
class _Kept:
    """One entry of a vendored copy as it was, for putting it back if its deletion is undone."""

    parts: "tuple[str, ...]"  # its path inside the copy; () for the copy itself
    status: os.stat_result  # as os.lstat gives it
    data: Optional[bytes] = None  # a file's content
    link: Optional[str] = None  # a symlink's target


def _keep(root: Path, copy: Path) -> "list[_Kept]":
    """Everything in ``copy``, each folder before its content, read before anything changes.

    Deleting a file cannot be undone, and any unlink may fail halfway through a
    copy (EBUSY, an immutable file, a read-only mount), so what the deletion
    removes is kept in memory (a vendored copy is a few files) to be recreated.
    What could not be recreated (unreadable, a device) refuses the deletion now.
    """
    kept: "list[_Kept]" = []

    def visit(path: Path, parts: "tuple[str, ...]") -> None:
        with _refusing(f"cannot delete {_name(root, path)}"):
            status = os.lstat(path)
            if stat.S_ISLNK(status.st_mode):
                kept.append(_Kept(parts, status, link=os.readlink(path)))
            elif stat.S_ISREG(status.st_mode):
                kept.append(_Kept(parts, status, data=path.read_bytes()))
            elif stat.S_ISDIR(status.st_mode):
                kept.append(_Kept(parts, status))
                for name in sorted(os.listdir(path)):
                    visit(path / name, (*parts, name))
            else:
                raise Refused(f"cannot delete {_name(root, path)}: not a file, folder or symlink")

    visit(copy, ())
    return kept


def _delete(root: Path, copy: Path, aside: Path, kept: "list[_Kept]") -> None:
    """Delete ``copy``, now at ``aside``, content before folders; a failure names the file as it was."""
    for entry in reversed(kept):
        with _refusing(f"cannot delete {_name(root, copy.joinpath(*entry.parts))}"):
            path = aside.joinpath(*entry.parts)
            if stat.S_ISDIR(entry.status.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)


def _restore(aside: Path, kept: "list[_Kept]") -> None:
    """Recreate at ``aside`` what ``_delete`` removed, with its owner, permission bits and times."""
    for entry in kept:  # each folder before its content
        path = aside.joinpath(*entry.parts)
        if os.path.lexists(path):
            continue
        if entry.link is not None:
            os.symlink(entry.link, path)
        elif entry.data is not None:
            with open(path, "xb") as stream:
                stream.write(entry.data)
        else:
            os.mkdir(path, 0o700)  # its own bits once its content is back
        if hasattr(os, "chown"):
            with contextlib.suppress(PermissionError):  # only root may give a file away
                os.chown(path, entry.status.st_uid, entry.status.st_gid, follow_symlinks=False)
    for entry in reversed(kept):  # content first: recreating it changes its folder's times
        if entry.link is None:
            path = aside.joinpath(*entry.parts)
            os.chmod(path, stat.S_IMODE(entry.status.st_mode))
            os.utime(path, ns=(entry.status.st_atime_ns, entry.status.st_mtime_ns))


def _undo(steps: "list[tuple[str, Callable[[], object]]]") -> "list[str]":
    """Run the undo steps, last first; the names of those that failed."""
    failed = []
    for name, step in reversed(steps):
        try:
            step()
        except OSError:
            failed.append(name)
    return failed


def _apply(root: Path, changed: "dict[Path, Rewrite]", doomed: "list[Path]") -> None:
    """Write every rewrite and delete every folder in ``doomed``, or change nothing and raise Refused.

    Nothing is touched until every check passed, every temporary is written
    and every file to delete is read; then the copies are renamed aside, the
    files replaced and the copies deleted, each step undone if a later one
    fails (a deleted file is recreated from what was read).
    """
    _check(root, changed, doomed)
    kept = {copy: _keep(root, copy) for copy in doomed}
    staged: "list[_Staged]" = []
    undo: "list[tuple[str, Callable[[], object]]]" = []
    try:
        for file, rewrite in changed.items():
            staged.append(_stage(root, file, rewrite))
        for item in staged:
            with _refusing(f"cannot write {item.name}"):
                if item.target.read_bytes() != item.old:
                    raise Refused(f"cannot write {item.name}: it changed while being migrated")
        asides: "dict[Path, Path]" = {}
        for copy in doomed:  # renamed aside first: nothing can import it while the files change
            aside = copy.with_name(f".{copy.name}.{uuid.uuid4().hex[:8]}.autosyncbn-deleted")
            name = _name(root, copy)
            with _refusing(f"cannot delete {name}"):
                os.rename(copy, aside)
            undo.append((f"{name} (now {_name(root, aside)})", functools.partial(os.rename, aside, copy)))
            asides[copy] = aside
        for item in staged:
            with _refusing(f"cannot write {item.name}"):
                os.replace(item.new_file, item.target)
            undo.append((item.name, functools.partial(os.replace, item.backup, item.target)))
        for copy, aside in asides.items():  # last: the one step undone by recreating files
            undo.append((f"{_name(root, copy)} (now {_name(root, aside)}, partly deleted)",
                         functools.partial(_restore, aside, kept[copy])))
            _delete(root, copy, aside, kept[copy])
    except Refused as refused:
        refused.left = _undo(undo)
        raise
    except BaseException:
        _undo(undo)
        raise
    finally:
        for item in staged:
            for temporary in (item.new_file, item.backup):
                with contextlib.suppress(OSError):
                    temporary.unlink()


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
    try:
        changed, issues, skipped = _rewrite_all(root, vendored)
        doomed = vendored if args.delete_vendored and not issues else []
        if args.write:
            _apply(root, changed, doomed)
    except Refused as refused:
        _say(f"autosyncbn migrate: {refused}")
        return 1
    for copy in vendored:
        _say(f"Vendored sync_batchnorm: {copy.relative_to(root).as_posix()}")
    for line in skipped:
        _say(line)
    _print_diff(root, changed)

    if not changed:
        _say("No import to rewrite.")
    elif args.write:
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
            for copy in doomed:
                _say(f"Deleted {copy.relative_to(root).as_posix()}")
    return 1 if issues else 0
