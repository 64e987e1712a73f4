"""One synchronized DataParallel forward: prepare its replicas, run them, check what ran.

Everything here starts in the caller's thread, after ``replicate`` made the
replicas and right where ``parallel_apply`` is about to run them: the one
place that sees all replicas at once. :func:`run_forward`

1. runs the classic replication callbacks (``__data_parallel_replicate__``);
2. gives replicas listed on the device of replica 0 buffers of their own
   (a device named twice in ``device_ids`` would otherwise share them);
3. makes the forward's ``ReplicaGroup`` and one :class:`ReplicaCall` per
   replica, which enters the replica's context in its thread around the
   whole call (pre-hooks, forward, hooks, re-entrant calls) and reports its
   end or its error to the group, so peers never wait for a replica that
   cannot come;
4. when replica 0's call ends (in its thread), warns about any of its
   BatchNorm layers that should have synchronized but counted a step without
   calling F.batch_norm.
"""
from __future__ import annotations

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


def execute_replication_callbacks(replicas: Sequence[nn.Module]) -> None:
    """Call ``__data_parallel_replicate__(ctx, copy_id)`` on every module that defines it.

    The j-th module of every replica shares one context, as in the classic
    ``sync_batchnorm`` package, so third-party modules written for it work.
    """
    contexts = [CallbackContext() for _ in replicas[0].modules()]
    for copy_id, replica in enumerate(replicas):
        for index, module in enumerate(replica.modules()):
            callback = getattr(module, "__data_parallel_replicate__", None)
            if callback is not None:
                callback(contexts[index], copy_id)


def _own_buffers(replicas: Sequence[nn.Module]) -> None:
    """Replicas after the first get copies of buffers they share with replica 0.

    A device listed twice in ``device_ids`` gets the source tensors themselves
    from PyTorch's broadcast; replica 0 alone updates running statistics, and
    ``num_batches_tracked`` must count each step once.
    """
    first = {id(b) for b in replicas[0].buffers()}
    for replica in replicas[1:]:
        for module in replica.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and id(buffer) in first:
                    module._buffers[key] = buffer.clone()


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The caller's enabled autocast device types and dtypes (parallel_apply drops the dtype)."""
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(t, torch.get_autocast_dtype(t)) for t in types if torch.is_autocast_enabled(t)]


class ReplicaCall:
    """Calls replica ``index`` inside its context; ``parallel_apply`` calls it as the module."""

    def __init__(self, replica: nn.Module, context: ReplicaContext, autocast: list) -> None:
        self.replica = replica
        self.context = context
        self.autocast = autocast

    def __getattr__(self, name: str) -> Any:
        return getattr(self.replica, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        group, index = self.context.group, self.context.index
        group.replica_started(index)
        watched = _watched_layers(self.replica) if index == 0 and group.num_replicas > 1 else []
        try:
            with entered(self.context), _autocast(self.autocast):
                output = self.replica(*args, **kwargs)
        except BaseException as error:
            group.replica_finished(index, error)
            raise
        group.replica_finished(index)
        for layer, version in watched:
            if layer.num_batches_tracked._version != version and self._should_have_synchronized(layer):
                warn_unreached(self.context, layer)
        return output

    def _should_have_synchronized(self, layer: _BatchNorm) -> bool:
        context = self.context
        if id(layer) in context.synchronized or context.excludes(layer):
            return False
        return context.plan.include_plain or bool(getattr(layer, "_autosyncbn_explicit", False))


def _watched_layers(replica: nn.Module) -> list[tuple[_BatchNorm, int]]:
    """Replica 0's training BatchNorm layers and the version of their step counter.

    A layer that ran counts its step (``num_batches_tracked.add_(1)``), which
    bumps the counter's version; reading a version never waits for a GPU.
    """
    return [
        (module, module.num_batches_tracked._version)
        for module in replica.modules()
        if isinstance(module, _BatchNorm) and module.training and module.num_batches_tracked is not None
    ]


class _autocast:
    """Re-enter the caller's autocast dtypes inside a replica thread."""

    def __init__(self, state: list) -> None:
        self.contexts = [torch.autocast(device, dtype=dtype) for device, dtype in state]

    def __enter__(self) -> None:
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self.contexts):
            context.__exit__(*exc)


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
    execute_replication_callbacks(replicas)
    _own_buffers(replicas)
    group = ReplicaGroup(len(replicas), plan.timeout)
    autocast = _autocast_state()
    calls = [ReplicaCall(replica, ReplicaContext(group, index, replica, plan), autocast)
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
