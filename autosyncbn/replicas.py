"""Registration at ``replicate``: every replica of one DataParallel forward joins one group.

``replicate`` (patched by ``install()``, overridden by ``DataParallelWithCallback``,
wrapped on an instance by ``patch_replication_callback``) makes the replicas
in the caller's thread, before any of them runs: the one moment that sees
all of them. :func:`register` then, in one walk over each replica's modules:

1. gives every module a *seat*, ``module.__dict__[SEAT] = (group, replica, j)``:
   the forward's group, the replica it belongs to and its position j in the
   module tree (the same j in every replica). A BatchNorm call finds its replica from the module
   that makes it, so a replica synchronizes whoever runs it: PyTorch's
   ``parallel_apply``, a subclass's own threads, a test harness;
2. calls the classic replication callbacks (``__data_parallel_replicate__``),
   the j-th module of every replica sharing one context;
3. gives replicas on replica 0's device buffers of their own (a device named
   twice in ``device_ids`` would share them; replica 0 alone updates them);
4. puts a start and an end hook on each replica's root module. They mark the
   thread as running that replica (for calls no module makes), carry the
   caller's autocast dtype in (``parallel_apply`` drops it), and report the
   replica's end or error to the group, so peers never wait for a replica
   that cannot come. When replica 0 ends, layers that counted a training step
   without passing through autosyncbn are warned about.

The forward's plan is fixed here, and the patches are held until every
replica has ended (or the replicas are gone): an ``uninstall()`` meanwhile
never splits a forward in two. Nothing here refers back to a module, so a
step leaves no reference cycle behind.
"""
from __future__ import annotations

import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import report, settings
from .errors import PeerFailedError, SyncBatchNormError
from .group import ReplicaGroup
from .private_api import ALWAYS_CALLED_HOOKS, always_called_hooks
from .settings import LayerFilter

SEAT = "_autosyncbn_seat"
"""Instance attribute of every module of a registered replica: ``(group, replica number, layer index)``."""

EXCLUDED_ATTRIBUTE = "_autosyncbn_excluded"
"""Instance attribute marking a module whose BatchNorm calls stay per slice (``autosyncbn.exclude``)."""

EXPLICIT_ATTRIBUTE = "_autosyncbn_explicit"
"""Class or instance attribute: an autosyncbn layer, synchronized under the explicit API too
(the ``SynchronizedBatchNorm*`` classes; other ``_BatchNorm`` subclasses marked by ``convert_model``)."""

_HOOK = "autosyncbn"  # the key of our hooks in a replica root's own hook tables

RUNNING = threading.local()
"""``RUNNING.replica``: the (group, replica number) this thread runs, if any (see :func:`running_replica`)."""


@dataclass(frozen=True)
class ReplicaPlan:
    """What one DataParallel forward synchronizes, fixed at replicate.

    ``include_plain``: every batch-statistics computation (``install()``), or
    only autosyncbn's layers (the explicit API).
    """

    timeout: float
    include_plain: bool
    exclude: Optional[LayerFilter] = None
    distributed: bool = False
    process_group: Any = None


def plan_of(options: Optional[settings.Options]) -> Optional[ReplicaPlan]:
    """What ``install()``/``patched()`` options synchronize in a DataParallel forward."""
    if options is None:
        return None
    return ReplicaPlan(options.timeout, include_plain=True, exclude=options.exclude,
                       distributed=options.distributed, process_group=options.process_group)


LIVE = [0]
"""Forwards registered and not yet ended (or still recomputable): read without the lock."""
_live_lock = threading.Lock()


def live_groups() -> int:
    """How many registered forwards have a replica still running (or not yet started)."""
    return LIVE[0]


def running_replica() -> "Optional[tuple[ReplicaGroup, int]]":
    """The (group, replica number) this thread is running, or None."""
    return getattr(RUNNING, "replica", None)


class CallbackContext:
    """Shared by the copies of one module across replicas (classic ``sync_batchnorm`` API)."""


def _in_tree_order(root: nn.Module) -> list[nn.Module]:
    """``root.modules()`` as a list, without a generator step per module."""
    stack: list[Optional[nn.Module]]
    order, seen, stack = [], set(), [root]
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        order.append(module)
        children = list(module._modules.values())
        children.reverse()
        stack.extend(children)
    return order


def _names_of(root: "weakref.ref[nn.Module]") -> Callable[[], list]:
    def names() -> list:
        module = root()
        return [name or "<root>" for name, _ in module.named_modules()] if module is not None else []
    return names


def register(replicas: Sequence[nn.Module], plan: Optional[ReplicaPlan], network: Optional[nn.Module] = None) -> None:
    """Seat every replica's modules in one new group for this forward (see the module docstring).

    ``network``: the module the replicas were made from (a TorchScript replica hides its layers).
    """
    if plan is None or not replicas:
        return
    if _registered(replicas):  # DataParallel.replicate calls replicate(): registered by the inner hook
        if not plan.include_plain:  # an explicit DataParallel's own timeout is the more specific one
            replicas[0].__dict__[SEAT][0].timeout = plan.timeout
        return
    outer = running_replica()
    if outer is not None and outer[0].num_replicas > 1:
        raise SyncBatchNormError(
            "a DataParallel runs inside a replica of another DataParallel: its BatchNorm layers "
            "could synchronize only within each outer replica's slice. Wrap only the outermost model.")
    group = ReplicaGroup(len(replicas), plan.timeout, plan, _names_of(weakref.ref(replicas[0])))
    group.autocast = _autocast_state()
    group.on_finished = weakref.finalize(group, _forward_ended, settings.hold_patches())
    with _live_lock:
        LIVE[0] += 1
    contexts: dict[int, CallbackContext] = {}
    first_buffers: set[int] = set()
    for replica, root in enumerate(replicas):
        for index, module in enumerate(_in_tree_order(root)):
            module.__dict__[SEAT] = (group, replica, index)
            buffers = module._buffers
            if not isinstance(buffers, dict):  # a scripted module: TorchScript's own view of its buffers
                buffers = {}
            if replica == 0:
                if isinstance(module, torch.jit.ScriptModule):
                    _warn_scripted(group, index, network)
                for buffer in buffers.values():
                    first_buffers.add(id(buffer))
                steps = buffers.get("num_batches_tracked")
                if steps is not None and module.training and isinstance(module, _BatchNorm):
                    group.watched.append((weakref.ref(module), steps._version, index))
            elif first_buffers:
                for key, buffer in buffers.items():
                    if buffer is not None and id(buffer) in first_buffers:
                        buffers[key] = buffer.clone()
            callback = getattr(type(module), "__data_parallel_replicate__", None)
            if callback is not None:
                callback(module, contexts.setdefault(index, CallbackContext()), replica)
        _hook(root)


def _warn_scripted(group: ReplicaGroup, index: int, network: Optional[nn.Module]) -> None:
    """A scripted or traced module's BatchNorm layers normalize inside TorchScript, where autosyncbn
    cannot reach (its replica shows none of them: they are read from ``network``)."""
    name = group.layer_name(index)
    try:
        # network is there whenever a replica is scripted (replicate had the module)
        scripted: nn.Module = (network if name == "<root>"  # type: ignore[assignment]
                               else network.get_submodule(name))  # type: ignore[union-attr]
    except AttributeError:
        return
    for path, _buffer in scripted.named_buffers():
        if not path.endswith("running_mean") or not scripted.training:
            continue
        layer = ".".join(part for part in (name if name != "<root>" else "", path[:-len(".running_mean")]) if part)
        report.left_per_slice(
            f"scripted:{layer}", layer,
            f"BatchNorm layer '{layer}' is TorchScript (torch.jit.script or trace): its statistics are "
            f"computed inside TorchScript, which autosyncbn cannot reach, so it normalizes per slice in "
            f"DataParallel replicas. Run the model unscripted inside DataParallel (script it for export).",
            "TorchScript: cannot synchronize")


def warn_unregistered(modules: Sequence[nn.Module]) -> None:
    """A DataParallel runs modules side by side that ``replicate`` did not make (its ``replicate``
    deep-copies the module, or the replicas were made before ``install()``): warn, under ``install()``."""
    if len(modules) < 2 or SEAT in modules[0].__dict__ or not settings.active():
        return
    if len({id(module) for module in modules}) < 2:
        return
    for name, layer in modules[0].named_modules():
        if isinstance(layer, _BatchNorm) and layer.training and not layer.__dict__.get(EXCLUDED_ATTRIBUTE, False):
            name = name or "<root>"
            report.left_per_slice(
                f"unprepared:{name}", name,
                f"BatchNorm layer '{name}' ran in modules that parallel_apply runs side by side, but "
                f"they were not made by torch.nn.parallel.replicate (a DataParallel whose replicate "
                f"deep-copies the module, or replicas made before install()): autosyncbn cannot tell "
                f"that they are replicas of one model, so it normalized per slice.",
                "replica not made by torch.nn.parallel.replicate")


def _registered(replicas: Sequence[nn.Module]) -> bool:
    """Whether these replicas hold the seats of one group (a copy of a module copies its seat too)."""
    seat = replicas[0].__dict__.get(SEAT)
    if seat is None or seat[0].num_replicas != len(replicas):
        return False
    return all(root.__dict__.get(SEAT, (None, -1))[:2] == (seat[0], replica) for replica, root in enumerate(replicas))


def _forward_ended(release_patches: Callable[[], None]) -> None:
    """At the last replica's end, or when the replicas are gone without running."""
    with _live_lock:
        LIVE[0] -= 1
    release_patches()


def _hook(root: nn.Module) -> None:
    """Our start hook first and end hook last, in hook tables of the replica's own
    (a replica shares its hook tables with the original module)."""
    own = root.__dict__
    own["_forward_pre_hooks"] = OrderedDict([(_HOOK, _replica_started), *root._forward_pre_hooks.items()])
    own["_forward_hooks"] = OrderedDict([*root._forward_hooks.items(), (_HOOK, _replica_ended)])
    own[ALWAYS_CALLED_HOOKS] = OrderedDict([*always_called_hooks(root).items(), (_HOOK, True)])


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The caller's enabled autocast device types and dtypes (parallel_apply drops the dtype)."""
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(t, torch.get_autocast_dtype(t)) for t in types if torch.is_autocast_enabled(t)]


def _replica_started(root: nn.Module, args: Any) -> None:
    group, replica, _ = root.__dict__[SEAT]
    group.depth[replica] += 1
    if group.depth[replica] > 1:
        return  # the root's forward calls the root again: one replica's forward still
    group.started[replica] = True
    group.outer[replica], RUNNING.replica = running_replica(), (group, replica)
    group.outer_errors[replica] = sys.exc_info()[1]  # an exception the caller is handling is not ours
    for device, dtype in group.autocast:
        context = torch.autocast(device, dtype=dtype)
        context.__enter__()
        group.entered[replica].append(context)


def _replica_ended(root: nn.Module, args: Any, result: Any) -> None:
    """Also called when the forward raised (an always-called hook, inside PyTorch's except block)."""
    group, replica, _ = root.__dict__[SEAT]
    group.depth[replica] -= 1
    if group.depth[replica] > 0:
        return
    entered = group.entered[replica]
    while entered:
        entered.pop().__exit__(None, None, None)
    RUNNING.replica, group.outer[replica] = group.outer[replica], None
    error = sys.exc_info()[1]
    if error is group.outer_errors[replica]:
        error = None
    group.outer_errors[replica] = None
    group.replica_finished(replica, error)
    if replica == 0 and group.watched and error is None:  # a failed forward may have stopped before a call
        _warn_unreached(group)


def _warn_unreached(group: ReplicaGroup) -> None:
    """Replica 0's layers that counted a training step without reaching autosyncbn.

    (PyTorch's kernel updates running statistics without bumping their version:
    a layer that does not count ``num_batches_tracked`` cannot be watched.)"""
    for layer_ref, version, index in group.watched:
        layer = layer_ref()
        if (layer is None or layer._buffers["num_batches_tracked"]._version == version
                or id(layer._buffers.get("running_mean")) in group.seen):
            continue
        name = group.layer_name(index)
        plan = group.plan
        if layer.__dict__.get(EXCLUDED_ATTRIBUTE, False) or (plan.exclude is not None and plan.exclude(name, layer)):
            continue
        report.left_per_slice(
            f"unreached:{name}", name,
            f"BatchNorm layer '{name}' in a DataParallel replica ran a training step without passing "
            f"through torch.nn.functional.batch_norm (it calls torch.batch_norm or a kernel directly, "
            f"or runs compiled code): it normalized per slice. Exclude it with autosyncbn.exclude() "
            f"to silence this, or call F.batch_norm.",
            "not reached: did not call F.batch_norm")


def reraise_replica_error(replicas: Sequence[Any], error: BaseException) -> NoReturn:
    """Re-raise the error a runner re-raised for a replica (``ExceptionWrapper.reraise``).

    A replica that only saw a peer fail gives way to the peer's own error
    (:func:`reraise_root_failure`). The runner's frames are dropped from the
    traceback: PyTorch's ``reraise`` frame holds the error itself, a cycle that
    would keep every replica's activations alive until the garbage collector
    runs. The message holds the replica's own traceback.
    """
    error.__traceback__ = None
    try:
        if isinstance(error, PeerFailedError):
            reraise_root_failure(replicas, error)
        raise error
    finally:
        error = None  # type: ignore[assignment]


def reraise_root_failure(replicas: Sequence[Any], peer_error: PeerFailedError) -> None:
    """A runner re-raised a replica that only saw a peer fail: raise the peer's own error instead.

    The caller then catches what really happened (an out-of-memory error, say,
    as a new exception of its type whose message holds the replica's traceback,
    as DataParallel gives it), with this ``PeerFailedError`` chained once.
    """
    seat = replicas[0].__dict__.get(SEAT) if replicas else None
    failure = seat[0].root_failure() if seat is not None else None
    if failure is None:
        return
    error = failure.rebuilt()
    try:
        raise error from peer_error
    finally:  # this frame is in the error's traceback: no cycle through its locals
        error = peer_error = None  # type: ignore[assignment]
