"""``install()``, ``uninstall()``, ``is_installed()`` and ``patched()``, through wrapt.

One table of patches drives both directions. Each entry names the owner, the
attribute and the wrapper; install records the original from ``vars(owner)``
and whether the owner held it itself, so uninstall restores the exact object
(or deletes the attribute if it was inherited). All changes happen under one
lock, roll back if one fails, and "installed" is marked last.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import wrapt
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .forward import SYNC_ATTRIBUTE, active_handle, synchronized_forward
from .group import DEFAULT_TIMEOUT, ReplicaGroup
from .modules import is_synchronized_class
from .parallel import LayerFilter, prepare_replicas


@dataclass(frozen=True)
class Options:
    """What ``install()`` was asked for."""

    timeout: float = DEFAULT_TIMEOUT
    exclude: Optional[LayerFilter] = None
    distributed: bool = False
    process_group: Any = None


@dataclass
class _Patch:
    owner: Any
    attribute: str
    wrapper: Callable
    original: Any = None
    owned: bool = False


_lock = threading.RLock()
_options: Optional[Options] = None  # None: not installed
_applied: list[_Patch] = []
_live_groups: "weakref.WeakSet[ReplicaGroup]" = weakref.WeakSet()
_replicating = threading.local()


def _prepare(replicas: list) -> None:
    options = _options
    if options is None:
        return
    group = prepare_replicas(
        replicas, include_plain=True, exclude=options.exclude, timeout=options.timeout
    )
    if group is not None:
        _live_groups.add(group)


def _wrap_replicate(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``replicate``: attach a sync group to the replicas it returns.

    Wraps both ``nn.DataParallel.replicate`` and the module-level ``replicate``
    that it (and the functional ``data_parallel()``) calls; the thread-local
    flag keeps the hook from running twice for one forward.
    """
    if getattr(_replicating, "active", False):
        return wrapped(*args, **kwargs)
    _replicating.active = True
    try:
        replicas = wrapped(*args, **kwargs)
    finally:
        _replicating.active = False
    _prepare(replicas)
    return replicas


def _wrap_batchnorm_forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``_BatchNorm.forward``: synchronize when this layer has a handle, else PyTorch's own path."""
    options = _options
    if SYNC_ATTRIBUTE not in instance.__dict__ and (options is None or not options.distributed):
        return wrapped(*args, **kwargs)  # the fast path: outside every replica
    # A SynchronizedBatchNorm*d reaches here only after deciding, with its own
    # process group, not to synchronize; plain layers follow install()'s options.
    process_groups = options is not None and options.distributed and not is_synchronized_class(instance)
    handle = active_handle(instance, process_groups, options.process_group if options else None)
    if handle is None:
        return wrapped(*args, **kwargs)
    return synchronized_forward(instance, *args, handle=handle, **kwargs)


def _patch_table() -> list[_Patch]:
    data_parallel_module = sys.modules["torch.nn.parallel.data_parallel"]
    return [
        _Patch(nn.DataParallel, "replicate", _wrap_replicate),
        _Patch(data_parallel_module, "replicate", _wrap_replicate),
        _Patch(_BatchNorm, "forward", _wrap_batchnorm_forward),
    ]


def _apply(patch: _Patch) -> None:
    namespace = vars(patch.owner)
    patch.owned = patch.attribute in namespace
    patch.original = namespace[patch.attribute] if patch.owned else getattr(patch.owner, patch.attribute)
    setattr(patch.owner, patch.attribute, wrapt.FunctionWrapper(patch.original, patch.wrapper))


def _restore(patch: _Patch) -> None:
    if patch.owned:
        setattr(patch.owner, patch.attribute, patch.original)
    else:
        delattr(patch.owner, patch.attribute)


def _wait_for_live_groups(deadline_seconds: float) -> None:
    """Let forwards that already synchronize finish before their patch goes away."""
    deadline = time.monotonic() + deadline_seconds
    while any(group.in_flight for group in list(_live_groups)):
        if time.monotonic() > deadline:
            return
        time.sleep(0.001)


def install(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    exclude: Optional[LayerFilter] = None,
    distributed: bool = False,
    process_group: Any = None,
) -> None:
    """Make every ``nn.DataParallel`` synchronize the statistics of its BatchNorm layers.

    Patches ``nn.DataParallel.replicate`` (so subclasses and the functional
    ``torch.nn.parallel.data_parallel`` are covered) and ``_BatchNorm.forward``.
    Calling it again only updates the options.

    Args:
        timeout: seconds a replica waits for its peers at one BatchNorm call.
        exclude: ``(name, layer) -> bool``; True leaves that layer per-slice.
            ``name`` is the layer's qualified name inside the wrapped module.
            :func:`autosyncbn.exclude` marks layers instead.
        distributed: also synchronize plain BatchNorm layers across the
            ``torch.distributed`` process group when one is initialized.
        process_group: the group for ``distributed`` (default: the world).
    """
    global _options
    options = Options(timeout, exclude, distributed, process_group)
    with _lock:
        if _options is not None:
            _options = options
            return
        applied: list[_Patch] = []
        try:
            for patch in _patch_table():
                _apply(patch)
                applied.append(patch)
        except BaseException:
            for patch in reversed(applied):
                _restore(patch)
            raise
        _applied[:] = applied
        _options = options


def uninstall() -> None:
    """Restore the exact original callables. A no-op when not installed.

    Forwards that are already synchronizing finish first (up to their timeout),
    so a concurrent training step is never left half synchronized.
    """
    global _options
    with _lock:
        if _options is None:
            return
        timeout = _options.timeout
        _options = None  # new forwards stop synchronizing from here on
        _wait_for_live_groups(timeout)
        for patch in reversed(_applied):
            _restore(patch)
        _applied.clear()


def is_installed() -> bool:
    """True between ``install()`` and ``uninstall()``."""
    return _options is not None


@contextlib.contextmanager
def patched(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    exclude: Optional[LayerFilter] = None,
    distributed: bool = False,
    process_group: Any = None,
) -> Iterator[None]:
    """Synchronize BatchNorm for the ``with`` block only, then restore the state found.

    Scopes nest: an inner scope's exit puts back the outer scope's options and
    never uninstalls what the outer scope installed.

    Examples::

        >>> with autosyncbn.patched():
        ...     loss = criterion(nn.DataParallel(model)(x), y)
    """
    with _lock:
        found = _options
        install(timeout=timeout, exclude=exclude, distributed=distributed,
                process_group=process_group)
    try:
        yield
    finally:
        _restore_state(found)


def _restore_state(found: Optional[Options]) -> None:
    global _options
    with _lock:
        if found is None:
            uninstall()
        elif _options is not None:
            _options = found
        else:
            install(**vars(found))
