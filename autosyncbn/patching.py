"""``install()``, ``uninstall()``, ``is_installed()`` and ``patched()``.

One table of :class:`~autosyncbn.wrapping.Patch` entries drives both
directions; the table is applied while ``install()`` holds, any
``patched()`` scope is open or a synchronized forward runs, and restored when
the last of them lets go:

- ``torch.nn.functional.batch_norm``: every batch-statistics computation
  (``nn.BatchNorm*d``, ``nn.SyncBatchNorm`` without a process group, timm's
  ``BatchNormAct2d``, conditional BatchNorm) goes through ``dispatch``;
- ``nn.DataParallel.replicate`` and the ``replicate`` function it calls
  (under each name code calls it by, so ``data_parallel()`` and subclasses
  that skip ``super()`` are covered): each forward is decided there, once,
  and its replicas registered (``replicas.register``), whoever runs them;
- ``parallel_apply``, under each name DataParallel code calls it by: when it
  re-raises a replica that only saw a peer fail, the caller gets the peer's
  own error instead (``replicas.reraise_root_failure``);
- ``CheckpointFunction.apply``: reentrant checkpoints inside synchronized
  replicas run as non-reentrant ones (see :func:`_wrap_reentrant_checkpoint`);
- ``_BatchNorm._call_impl``: PyTorch's fast path, and under ``torch.compile``
  with ``distributed=True`` the layer tells ``compiling`` who it is.

Scopes across threads: patching is process-wide, so a scope makes every
thread's DataParallel forwards synchronize while it is open; each thread sees
the options of the innermost scope it entered (else ``install()``'s, else the
most recent scope's), and the patches stay while any holder (``install()``, a
scope, a running forward) is left.
``install()`` and ``uninstall()`` are kept apart from scopes: an
``uninstall()`` inside a scope ends the explicit install only.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.parallel
import torch.utils.checkpoint as checkpoint_module
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import report, settings
from .compiling import call_impl
from .dispatch import FUNCTIONAL_BATCH_NORM
from .replicas import plan_of, register, reraise_replica_error, running_replica, warn_unregistered
from .settings import DEFAULT_TIMEOUT, LayerFilter, Options
from .wrapping import Patch, SharedPatches


def _wrap_replicate(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``replicate(network, devices, ...)``: register the replicas under this thread's options."""
    replicas = wrapped(*args, **kwargs)
    register(replicas, plan_of(settings.current()), args[0] if args else kwargs.get("network"))
    return replicas


def _wrap_parallel_apply(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``parallel_apply(modules, inputs, ...)``: a DataParallel's modules not made by ``replicate``
    are warned about; the caller sees the failing replica's own error."""
    modules = args[0] if args else kwargs.get("modules", ())
    if isinstance(sys._getframe(1).f_locals.get("self"), nn.DataParallel):  # not an ensemble of models
        warn_unregistered(modules)
    try:
        return wrapped(*args, **kwargs)
    except BaseException as error:
        reraise_replica_error(modules, error)


def _wrap_reentrant_checkpoint(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``CheckpointFunction.apply(function, preserve_rng_state, *inputs)``: reentrant checkpointing,
    run as PyTorch's non-reentrant checkpoint inside synchronized replicas.

    A reentrant checkpoint records no graph in forward and runs each replica's
    recomputed segment with a backward of its own, one replica after another on
    the CPU: no replica's gradient could then include the statistics' gradient,
    which needs every replica's. The non-reentrant variant computes the same
    gradients and keeps the forward's graph, whose synchronized nodes span every
    replica; its recompute replays each call's whole-batch statistics.
    """
    running = running_replica()
    if running is None or running[0].num_replicas < 2 or kwargs:
        return wrapped(*args, **kwargs)
    function, preserve_rng_state, *inputs = args
    if not any(isinstance(value, torch.Tensor) and value.requires_grad for value in inputs):
        with torch.no_grad():  # as the reentrant variant: no input needs a gradient, nothing is recorded
            return function(*inputs)
    return checkpoint_module.checkpoint(function, *inputs, use_reentrant=False,
                                        preserve_rng_state=preserve_rng_state)


def _patch_table() -> list[Patch]:
    data_parallel = sys.modules["torch.nn.parallel.data_parallel"]  # DataParallel and data_parallel()
    replicate = sys.modules["torch.nn.parallel.replicate"]
    parallel_apply = sys.modules["torch.nn.parallel.parallel_apply"]
    return [
        FUNCTIONAL_BATCH_NORM,
        Patch(nn.DataParallel, "replicate", wrapper=_wrap_replicate),
        *[Patch(owner, "replicate", wrapper=_wrap_replicate)
          for owner in (data_parallel, replicate, torch.nn.parallel)],
        *[Patch(owner, "parallel_apply", wrapper=_wrap_parallel_apply)
          for owner in (data_parallel, parallel_apply, torch.nn.parallel)],
        Patch(checkpoint_module.CheckpointFunction, "apply", wrapper=_wrap_reentrant_checkpoint),
        # A plain function, not a wrapt wrapper: Dynamo traces it (it cannot trace into wrapt's C proxy).
        Patch(_BatchNorm, "_call_impl", replacement=call_impl),
    ]


PATCHES = SharedPatches(_patch_table)
"""The global patches, held by ``install()``, every open ``patched()`` scope and every
DataParallel forward that started under them: the last holder restores."""
settings.hold_patches_with(PATCHES)


def _acquire() -> None:
    """Hold the patches; a fresh installation warns anew about unsynchronized layers."""
    if PATCHES.users == 0:
        report.forget_warnings()
    PATCHES.acquire()


def install(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    exclude: Optional[LayerFilter] = None,
    distributed: bool = False,
    process_group: Any = None,
) -> None:
    """Synchronize every batch-statistics computation in ``nn.DataParallel`` replicas.

    Patches ``torch.nn.functional.batch_norm`` and ``replicate`` (see the
    module docstring). Calling it again only updates the options. Every call
    puts back any of our patches that another library removed. Bad options
    raise here.

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
            _acquire()
        PATCHES.reapply()  # puts back any of our patches another library removed
        settings.set_installed(options)


def uninstall() -> None:
    """End ``install()``. A no-op when not installed.

    New forwards stop synchronizing at once; the exact original callables
    are restored when the last holder lets go (a ``patched()`` scope, or a
    DataParallel forward still running, which finishes synchronized: a
    concurrent training step is never left half synchronized). It never
    waits. Another library's wrapper on top of ours is never torn: ours then
    stays beneath it as a pass-through.
    """
    with settings.lock():
        options = settings.installed()
        if options is None:
            return
        settings.set_installed(None)  # new forwards stop synchronizing from here on
        PATCHES.release()  # forwards still running hold the patches until they end


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

    Patching is process-wide: while the block runs, DataParallel forwards in
    every thread synchronize. Scopes nest and may overlap across threads: each
    thread sees the options of the innermost scope it entered (else those of
    ``install()``, else the most recent scope's), and the patches stay until
    the last holder lets go, even after an exception.

    Examples::

        >>> with autosyncbn.patched():
        ...     loss = criterion(nn.DataParallel(model)(x), y)
    """
    options = Options(timeout, exclude, distributed, process_group)
    with settings.lock():
        _acquire()
        token = settings.open_scope(options)
    try:
        yield
    finally:
        with settings.lock():
            settings.close_scope(token)
            PATCHES.release()
