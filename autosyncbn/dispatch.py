"""The one decision: does this batch-statistics computation synchronize, and with whom?

Every BatchNorm call that autosyncbn sees arrives at :func:`batch_norm`, with
``F.batch_norm``'s arguments: calls of ``torch.nn.functional.batch_norm``
through its patch (``nn.BatchNorm*d``, ``nn.SyncBatchNorm`` without a process
group, subclasses with their own forward such as timm's ``BatchNormAct2d``,
conditional BatchNorm), and autosyncbn's own layers directly. :func:`decide`
answers, in this order:

1. eval mode (running statistics): PyTorch's own call, bit for bit;
2. inside a DataParallel replica: the replica's group, unless the plan of
   that forward leaves this kind of call alone or the layer is excluded;
3. a module of a replica whose forward has ended (``torch.utils.checkpoint``
   recomputing it in backward): ``CheckpointRecomputeError``;
4. a process group of 2+ ranks that may be used (``install(distributed=True)``
   for every call, always for autosyncbn's layers): the group, unless excluded;
5. anything else: PyTorch's own call. A replica that autosyncbn did not
   prepare is warned about, once per layer.

Under ``torch.compile``: autosyncbn's own layers, when they could synchronize,
run eagerly behind a graph break, so they synchronize exactly as eager ones.
``F.batch_norm`` itself is one operator to the compiler, traced on fake
tensors: a call of it that would have to synchronize raises a clear error at
the first call instead of compiling to per-slice statistics. A call that
cannot synchronize is traced as PyTorch's own (no extra graph break).
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from . import context as replica_context
from . import functional, report, settings
from .context import EXCLUDED_ATTRIBUTE, ReplicaContext
from .distributed import ProcessGroupTransport, usable_group
from .errors import CheckpointRecomputeError, SyncBatchNormError, UnsynchronizedBatchNormWarning
from .naming import calling_module, qualified_name
from .wrapping import Patch


@dataclass(frozen=True)
class Route:
    """Where one call goes: an exchange to synchronize through, or None for PyTorch's own path."""

    exchange: Optional[functional.Exchange]
    layer: str
    reason: str
    updates_running_stats: bool = False
    replica: Optional[int] = None


def decide(input: Tensor, owner: Optional[nn.Module], explicit: bool, process_group: Any,
           context: Optional[ReplicaContext], options: Optional[settings.Options]) -> Route:
    """Route one training-mode call (batch statistics). The only place that decides."""
    distributed = options is not None and options.distributed
    if process_group is None and distributed:
        process_group = options.process_group  # type: ignore[union-attr]
    group = usable_group(process_group) if explicit or distributed else None
    if context is not None:
        return _replica_route(input, owner, explicit, group, context)
    ended = replica_context.finished_forward_of(owner)
    if ended is not None:
        raise CheckpointRecomputeError(
            f"BatchNorm layer '{ended.name_of(owner)}' ran in replica {ended.index} after that "
            f"replica's forward had ended. This happens when torch.utils.checkpoint recomputes a "
            f"synchronized layer during backward: the replicas cannot meet again then. Keep "
            f"synchronized BatchNorm outside checkpointed segments, or exclude the layer with "
            f"autosyncbn.exclude()."
        )
    # As nn.SyncBatchNorm: a module in eval mode (batch statistics without running
    # ones) stays local, so one rank may evaluate alone without a collective.
    if group is not None and (owner is None or owner.training):
        layer = qualified_name(owner)
        if _excluded_from_processes(owner, layer, None if explicit else options):
            return Route(None, layer, "excluded")
        return Route(functional.merge_over(ProcessGroupTransport(group, layer)), layer,
                     f"process group of {torch.distributed.get_world_size(group)}",
                     updates_running_stats=True)
    if owner is not None and owner.__dict__.get("_is_replica", False) and settings.active():
        layer = qualified_name(owner)
        if owner.__dict__.get(EXCLUDED_ATTRIBUTE, False):
            return Route(None, layer, "excluded")
        _warn_once(f"unprepared:{layer}",
                   f"BatchNorm layer '{layer}' ran in a DataParallel replica that autosyncbn did "
                   f"not prepare: its forward started before install(), or its DataParallel runs "
                   f"replicas without torch.nn.parallel.parallel_apply. It normalized per slice.")
        return Route(None, layer, "replica not prepared by autosyncbn")
    if explicit or distributed:
        reason = "eval mode: stays local, as nn.SyncBatchNorm" if group is not None else "no process group of 2+ ranks"
    else:
        reason = "not in a DataParallel replica"
    return Route(None, _name_for_report(owner), reason)


def _replica_route(input: Tensor, owner: Optional[nn.Module], explicit: bool, group: Any,
                   context: ReplicaContext) -> Route:
    """A call inside replica ``context.index`` of a DataParallel forward."""
    layer = context.name_of(owner)
    replicas = context.group.num_replicas
    if replicas == 1:
        return Route(None, layer, "a single replica: one device", replica=0)
    if group is not None:
        raise SyncBatchNormError(
            f"BatchNorm layer '{layer}' runs in a DataParallel replica inside a process group of "
            f"2+ ranks: autosyncbn synchronizes across the replicas of one process or across "
            f"processes, not both at once. Use one process per GPU (DistributedDataParallel), "
            f"or leave out install(distributed=True) to synchronize within each process only."
        )
    if not (context.plan.include_plain or explicit):
        return Route(None, layer, "a plain layer under the explicit API (install() synchronizes it)",
                     replica=context.index)
    if context.excludes(owner):
        return Route(None, layer, "excluded", replica=context.index)
    context.mark_synchronized(owner)
    return Route(context.group.exchange_for(context.index, layer, input.shape[1]), layer,
                 f"{replicas} replicas", updates_running_stats=context.index == 0, replica=context.index)


def _excluded_from_processes(owner: Optional[nn.Module], layer: str,
                             options: Optional[settings.Options]) -> bool:
    if owner is None:
        return False
    if owner.__dict__.get(EXCLUDED_ATTRIBUTE, False):
        return True
    return bool(options is not None and options.exclude is not None and options.exclude(layer, owner))


def _name_for_report(owner: Optional[nn.Module]) -> str:
    return qualified_name(owner) if report.recording() else ""


# -- the entry point -------------------------------------------------------------
def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, owner: Optional[nn.Module] = None,
               explicit: bool = False, process_group: Any = None,
               plain: Optional[Callable[..., Tensor]] = None) -> Tensor:
    """``F.batch_norm`` whose batch statistics are synchronized when :func:`decide` says so.

    ``owner`` is the module making the call (found from the stack when None),
    ``explicit`` marks autosyncbn's own layers, ``process_group`` theirs, and
    ``plain`` is PyTorch's function to fall back to.
    """
    plain = plain or FUNCTIONAL_BATCH_NORM.underlying()
    if torch.compiler.is_compiling():
        # Decided at trace time: a call that could synchronize runs eagerly behind a
        # graph break (and decides again then); any other is traced as PyTorch's own.
        if training and _may_synchronize(explicit, process_group):
            return _batch_norm_eagerly(input, running_mean, running_var, weight, bias, training, momentum,
                                       eps, owner, explicit, process_group, plain)
        return plain(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _batch_norm_now(input, running_mean, running_var, weight, bias, training, momentum, eps,
                           owner, explicit, process_group, plain)


def _batch_norm_now(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                    eps: float, owner: Optional[nn.Module], explicit: bool, process_group: Any,
                    plain: Callable[..., Tensor]) -> Tensor:
    """Decide and run one call, eagerly."""
    if not training or input.dim() < 2:
        if report.recording():
            _record_eval(owner)
        return plain(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if owner is None:
        owner = calling_module()
    route = decide(input, owner, explicit, process_group, replica_context.current(), settings.current())
    if report.recording():
        report.record(route.layer or qualified_name(owner), route.exchange is not None, route.reason,
                      route.replica)
    if route.exchange is None:
        return plain(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return functional.batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                                 route.exchange, route.updates_running_stats)


def _record_eval(owner: Optional[nn.Module]) -> None:
    owner = owner or calling_module()
    context = replica_context.current()
    layer = context.name_of(owner) if context is not None else qualified_name(owner)
    report.record(layer, False, "eval mode: running statistics", context.index if context else None)


def _may_synchronize(explicit: bool, process_group: Any) -> bool:
    """At trace time: could this call synchronize when it runs? Reads nothing a tracer cannot."""
    if replica_context.current() is not None:
        return True
    distributed = settings.distributed_anywhere()
    if process_group is None and distributed is not None:
        process_group = distributed.process_group
    return (explicit or distributed is not None) and usable_group(process_group) is not None


_batch_norm_eagerly = torch._dynamo.disable(_batch_norm_now, recursive=True)


# -- the patch of torch.nn.functional.batch_norm ----------------------------------
def _wrap_functional_batch_norm(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``F.batch_norm``: synchronize batch statistics where :func:`decide` says so."""
    training = args[5] if len(args) > 5 else kwargs.get("training", False)
    if not training:
        if report.recording():
            _record_eval(None)
        return wrapped(*args, **kwargs)
    if _tracing(args[0] if args else kwargs["input"]):
        # torch.compile treats F.batch_norm as one operator: it runs this on fake
        # tensors to trace it, and the compiled graph never calls it again.
        if _may_synchronize(False, None):
            raise SyncBatchNormError(_COMPILE_MESSAGE)
        return wrapped(*args, **kwargs)
    if (replica_context.current() is None and not settings.distributed_anywhere()
            and not report.recording() and not _may_be_replica_call()):
        return wrapped(*args, **kwargs)  # the fast path: nothing to synchronize with
    return batch_norm(*args, plain=wrapped, **kwargs)


_COMPILE_MESSAGE = (
    "torch.compile is tracing a BatchNorm call that autosyncbn must synchronize (across "
    "DataParallel replicas or a process group): a compiled graph would normalize per slice. "
    "Convert the model before compiling, model = autosyncbn.convert_model(model): its "
    "layers synchronize behind a graph break. Subclasses with their own forward (timm's "
    "BatchNormAct2d) cannot be converted: run those models uncompiled, or compile with "
    "torch.compile(model, backend='eager')."
)


def _tracing(input: Any) -> bool:
    """Is this call being traced (fake or functional tensors), not run?"""
    return torch.compiler.is_compiling() or (type(input) is not Tensor and is_fake(input))


def _may_be_replica_call() -> bool:
    """Outside a prepared replica: is the caller a DataParallel replica's module? (Warned about.)

    Replicas run in worker threads, and checkpointed replica modules recompute
    inside backward: the main thread outside backward skips the frame walk.
    (Called only for calls that are run, not traced.)
    """
    if threading.current_thread() is _MAIN_THREAD and _current_backward_node() is None:
        return False
    owner = calling_module()
    return owner is not None and bool(owner.__dict__.get("_is_replica", False))


_MAIN_THREAD = threading.main_thread()
_current_backward_node = getattr(torch._C, "_current_autograd_node", lambda: True)

FUNCTIONAL_BATCH_NORM = Patch(F, "batch_norm", wrapper=_wrap_functional_batch_norm)
"""The patch of ``torch.nn.functional.batch_norm`` that ``install()`` applies."""


# -- warnings --------------------------------------------------------------------
_warned: set[str] = set()
_warned_lock = threading.Lock()


def forget_warnings() -> None:
    """Each installation warns once per layer (patching calls this when it first applies)."""
    with _warned_lock:
        _warned.clear()


def _warn_once(key: str, message: str) -> None:
    """One warning per layer and cause (replicas are new objects every forward: keyed by name)."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, UnsynchronizedBatchNormWarning, stacklevel=3)


def warn_unreached(context: ReplicaContext, layer: nn.Module) -> None:
    """A layer of replica 0 that counted a training step, but never called F.batch_norm."""
    name = context.name_of(layer)
    _warn_once(f"unreached:{name}",
               f"BatchNorm layer '{name}' in a DataParallel replica ran a training step without "
               f"passing through torch.nn.functional.batch_norm (it calls torch.batch_norm or a "
               f"kernel directly, or runs compiled code): it normalized per slice. Exclude it with "
               f"autosyncbn.exclude() to silence this, or call F.batch_norm.")
    if report.recording():
        report.record(name, False, "not reached: did not call F.batch_norm", context.index)
