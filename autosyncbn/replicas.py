"""One synchronized DataParallel forward: prepare its replicas, run them, check what ran.

Everything here starts in the caller's thread, after ``replicate`` made the
replicas and right where ``parallel_apply`` is about to run them: the one
place that sees all replicas at once. :func:`run_forward`

1. walks every replica's modules once (:func:`prepare_replicas`): the
   classic replication callbacks (``__data_parallel_replicate__``), buffers
   of their own for replicas on replica 0's device (a device named twice in
   ``device_ids`` would otherwise share them), and replica 0's layers to watch;
2. makes the forward's ``ReplicaGroup`` and one :class:`ReplicaCall` per
   replica, which enters the replica's context in its thread around the
   whole call (pre-hooks, forward, hooks, re-entrant calls) and reports its
   end or its error to the group, so peers never wait for a replica that
   cannot come;
3. when replica 0's call ends (in its thread), warns about any of its
   BatchNorm layers that should have synchronized but counted a step without
   calling F.batch_norm.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import settings
from .context import ReplicaContext, ReplicaPlan, entered
from .context import current as current_context
from .dispatch import warn_unreached
from .errors import PeerFailedError, SyncBatchNormError
from .group import ReplicaGroup

T = TypeVar("T")


class CallbackContext:
    """Shared by the copies of one module across replicas (classic ``sync_batchnorm`` API)."""


def prepare_replicas(replicas: Sequence[nn.Module]) -> list[tuple[_BatchNorm, int]]:
    """One walk over every replica's modules, before any replica runs.

    - Calls ``__data_parallel_replicate__(ctx, copy_id)`` on every module that
      defines it; the j-th module of every replica shares one context, as in
      the classic ``sync_batchnorm`` package, so modules written for it work.
    - Gives replicas after the first copies of buffers they share with replica
      0: a device listed twice in ``device_ids`` gets the source tensors
      themselves from PyTorch's broadcast, while replica 0 alone updates
      running statistics and ``num_batches_tracked`` must count each step once.
    - Returns replica 0's training BatchNorm layers with the version of their
      step counter: a layer that runs counts its step
      (``num_batches_tracked.add_(1)``), which bumps that version, and reading
      a version never waits for a GPU.
    """
    first_buffers = {id(b) for b in replicas[0].buffers()}
    contexts: list = []
    watched = []
    for copy_id, replica in enumerate(replicas):
        for index, module in enumerate(replica.modules()):
            if copy_id == 0:
                contexts.append(CallbackContext())
                if isinstance(module, _BatchNorm) and module.training and module.num_batches_tracked is not None:
                    watched.append((module, module.num_batches_tracked._version))
            else:
                for key, buffer in module._buffers.items():
                    if buffer is not None and id(buffer) in first_buffers:
                        module._buffers[key] = buffer.clone()
            callback = getattr(module, "__data_parallel_replicate__", None)
            if callback is not None:
                callback(contexts[index], copy_id)
    return watched


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The caller's enabled autocast device types and dtypes (parallel_apply drops the dtype)."""
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(t, torch.get_autocast_dtype(t)) for t in types if torch.is_autocast_enabled(t)]


class ReplicaCall:
    """Calls replica ``index`` inside its context; ``parallel_apply`` calls it as the module.

    ``watched``: replica 0's layers to check, once its call ends, for a step
    taken without F.batch_norm (see :func:`prepare_replicas`).
    """

    def __init__(self, replica: nn.Module, context: ReplicaContext, autocast: list,
                 watched: Sequence[tuple[_BatchNorm, int]] = ()) -> None:
        self.replica = replica
        self.context = context
        self.autocast = autocast
        self.watched = watched

    def __getattr__(self, name: str) -> Any:
        return getattr(self.replica, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        group, index = self.context.group, self.context.index
        try:
            with entered(self.context), contextlib.ExitStack() as stack:
                for device, dtype in self.autocast:  # parallel_apply drops the caller's dtype
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                output = self.replica(*args, **kwargs)
        except BaseException as error:
            group.replica_finished(index, error)
            raise
        group.replica_finished(index)
        for layer, version in self.watched:
            if layer.num_batches_tracked._version != version and self._should_have_synchronized(layer):
                warn_unreached(self.context, layer)
        return output

    def _should_have_synchronized(self, layer: _BatchNorm) -> bool:
        context = self.context
        if id(layer) in context.synchronized or context.excludes(layer):
            return False
        return context.plan.include_plain or bool(getattr(layer, "_autosyncbn_explicit", False))


def run_forward(replicas: Sequence[Any], plan: ReplicaPlan, run: Callable[[list], T]) -> T:
    """Run ``replicas`` through ``run`` (their ``parallel_apply``) as one synchronized forward.

    Replicas already wrapped by an outer call (a DataParallel subclass that
    also calls the patched ``parallel_apply``) are run as they are. A single
    replica gets a context too: it is one device, PyTorch's own path.
    """
    if not replicas or any(isinstance(r, ReplicaCall) for r in replicas):
        return run(list(replicas))
    if not all(getattr(r, "_is_replica", False) for r in replicas):
        return run(list(replicas))  # not copies of one model (an ensemble): nothing to synchronize
    outer = current_context()
    if outer is not None and outer.group.num_replicas > 1:
        raise SyncBatchNormError(
            "a DataParallel runs inside a replica of another DataParallel: its BatchNorm layers "
            "could synchronize only within each outer replica's slice. Wrap only the outermost model."
        )
    watched = prepare_replicas(replicas)
    group = ReplicaGroup(len(replicas), plan.timeout)
    autocast = _autocast_state()
    calls = [ReplicaCall(replica, ReplicaContext(group, index, replica, plan), autocast,
                         watched if index == 0 and len(replicas) > 1 else ())
             for index, replica in enumerate(replicas)]
    try:
        return run(calls)
    except PeerFailedError as peer_error:
        # parallel_apply re-raises the first replica's error; when that replica only
        # saw a peer fail, the peer's own exception is what the caller must see
        # (a loop that catches out-of-memory errors still catches them).
        root = group.root_failure()
        if root is None:
            raise
        index, error = root
        if hasattr(error, "add_note"):
            error.add_note(f"(raised in DataParallel replica {index}; autosyncbn stopped its peers at once)")
        raise error from peer_error


def plan_of(options: Optional[settings.Options]) -> Optional[ReplicaPlan]:
    """What ``install()``/``patched()`` options synchronize in a DataParallel forward."""
    if options is None:
        return None
    return ReplicaPlan(options.timeout, include_plain=True, exclude=options.exclude)


def run_parallel(replicas: Sequence[Any], run: Callable[[list], T],
                 explicit_plan: Optional[ReplicaPlan] = None) -> T:
    """The forward-level decision, once per DataParallel forward, before any replica runs.

    Under ``install()``/``patched()`` every batch-statistics call synchronizes
    (and the forward is counted, so ``uninstall()`` lets it finish); else the
    explicit API's ``explicit_plan`` applies, if any; else the replicas run as
    PyTorch runs them.
    """
    with settings.forward_options() as options:
        plan = plan_of(options) or explicit_plan
        if plan is None:
            return run(list(replicas))
        return run_forward(replicas, plan, run)
