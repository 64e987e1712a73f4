"""``install()``, ``uninstall()``, ``is_installed()`` and ``patched()``.

One table of :class:`~autosyncbn.wrapping.Patch` entries drives both
directions; the table is applied while ``install()`` holds or any
``patched()`` scope is open, and restored when the last of them lets go:

- ``torch.nn.functional.batch_norm``: every batch-statistics computation
  (``nn.BatchNorm*d``, ``nn.SyncBatchNorm`` without a process group, timm's
  ``BatchNormAct2d``, conditional BatchNorm) goes through ``dispatch``;
- ``parallel_apply``, under each name DataParallel code calls it by
  (``nn.DataParallel.parallel_apply`` and ``data_parallel()`` call the one in
  ``torch.nn.parallel.data_parallel``): each forward is decided there, once,
  before its replicas run (``replicas.run_parallel``).

Scopes across threads: each ``patched()`` scope belongs to the thread that
entered it and is counted; the last scope out restores, unless ``install()``
holds. ``install()`` and ``uninstall()`` are kept apart from scopes: an
``uninstall()`` inside someone's scope ends the explicit install only.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Optional

import torch.nn.parallel

from . import context, settings
from .dispatch import FUNCTIONAL_BATCH_NORM
from .replicas import run_parallel
from .settings import DEFAULT_TIMEOUT, LayerFilter, Options
from .wrapping import Patch, SharedPatches


def _wrap_parallel_apply(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``parallel_apply(modules, inputs, ...)``: run the replicas as one synchronized forward."""
    if args:
        modules, rest = args[0], args[1:]
    else:
        modules, rest = kwargs.pop("modules"), ()
    return run_parallel(modules, lambda calls: wrapped(calls, *rest, **kwargs))


def _patch_table() -> list[Patch]:
    names = [
        sys.modules["torch.nn.parallel.data_parallel"],  # DataParallel and data_parallel()
        sys.modules["torch.nn.parallel.parallel_apply"],  # subclasses importing the function
        torch.nn.parallel,
    ]
    return [FUNCTIONAL_BATCH_NORM] + [Patch(owner, "parallel_apply", wrapper=_wrap_parallel_apply)
                                      for owner in names]


PATCHES = SharedPatches(_patch_table)
"""The global patches, held by ``install()`` and by every open ``patched()`` scope."""


def _release(timeout: float) -> None:
    """Let go of one hold (its options already withdrawn). The last one lets the forwards
    that are running finish, up to ``timeout``, then restores the patches."""
    if PATCHES.users == 1 and context.current() is None:
        settings.wait_for_forwards(timeout)
    PATCHES.release()


def install(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    exclude: Optional[LayerFilter] = None,
    distributed: bool = False,
    process_group: Any = None,
) -> None:
    """Synchronize every batch-statistics computation in ``nn.DataParallel`` replicas.

    Patches ``torch.nn.functional.batch_norm`` and ``parallel_apply`` (see the
    module docstring). Calling it again only updates the options (and puts
    back a patch that another library removed). Bad options raise here.

    Args:
        timeout: seconds a replica waits for its peers at one BatchNorm call
            (a positive, finite number).
        exclude: ``(name, layer) -> bool``; True leaves that layer per slice.
            ``name`` is the layer's qualified name inside the wrapped module.
            :func:`autosyncbn.exclude` marks layers instead.
        distributed: also synchronize over the ``torch.distributed`` process
            group when one of 2+ ranks is initialized.
        process_group: the group for ``distributed`` (default: the world).
    """
    options = Options(timeout, exclude, distributed, process_group)
    with settings.lock():
        if settings.installed() is None:
            PATCHES.acquire()
        else:
            PATCHES.reapply()
        settings.set_installed(options)


def uninstall() -> None:
    """End ``install()``. A no-op when not installed.

    When no ``patched()`` scope holds the patches either, forwards already
    synchronizing finish first (up to their timeout), then the exact
    original callables are restored: a concurrent training step is never
    left half synchronized. Another library's wrapper on top of ours is
    never torn: ours then stays beneath it as a pass-through.
    """
    with settings.lock():
        options = settings.installed()
        if options is None:
            return
        settings.set_installed(None)  # new forwards stop synchronizing from here on
        _release(options.timeout)


def is_installed() -> bool:
    """True while ``install()`` or a ``patched()`` scope holds and every patch is in place."""
    return settings.active() and PATCHES.is_live()


@contextlib.contextmanager
def patched(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    exclude: Optional[LayerFilter] = None,
    distributed: bool = False,
    process_group: Any = None,
) -> Iterator[None]:
    """Synchronize BatchNorm for the ``with`` block only; options as :func:`install`.

    Scopes nest and may overlap across threads: each thread sees the options
    of the innermost scope it entered, and the patches stay until the last
    scope (and ``install()``) lets go, even after an exception.

    Examples::

        >>> with autosyncbn.patched():
        ...     loss = criterion(nn.DataParallel(model)(x), y)
    """
    options = Options(timeout, exclude, distributed, process_group)
    with settings.lock():
        PATCHES.acquire()
        token = settings.open_scope(options)
    try:
        yield
    finally:
        with settings.lock():
            settings.close_scope(token)
            _release(options.timeout)
