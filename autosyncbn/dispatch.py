"""The one decision: does this batch-statistics call synchronize, and with whom?

Every BatchNorm call autosyncbn sees arrives at :func:`batch_norm`, with
``F.batch_norm``'s arguments: calls of ``torch.nn.functional.batch_norm``
through its patch (``nn.BatchNorm*d``, ``nn.SyncBatchNorm`` without a process
group, timm's ``BatchNormAct2d``, conditional BatchNorm) and the calls of
autosyncbn's own layers, whose forward (PyTorch's ``_BatchNorm.forward``, or a
subclass's own) calls :func:`explicit_batch_norm` instead. A training call for
which :func:`nothing_to_synchronize` holds returns to PyTorch at once. Else
the module making it is the ``self`` of the calling frame (found by a walk up
the stack when a function makes it); its seat, given at ``replicate``
(``replicas.py``), names its replica. :func:`decide` answers, once per layer
and forward inside replicas:

1. eval mode (running statistics): PyTorch's own call, bit for bit;
2. a registered replica: its group, unless the forward's plan leaves this kind
   of call alone (plain layers under the explicit API: warned about), the
   layer is excluded, or there is one replica (one device);
3. a process group of 2+ ranks that may be used (``install(distributed=True)``
   for every call, always for autosyncbn's layers): the group, unless excluded;
4. anything else: PyTorch's own call. A replica autosyncbn did not register is
   warned about, once per layer.

A synchronized call made again after its replica's forward ended is a
recompute by activation checkpointing: it replays the statistics of the call
it recomputes (:func:`_replay`). A tensor-subclass input (MONAI's
``MetaTensor``) goes through its ``__torch_function__`` first, as in
``F.batch_norm``, and is normalized as a plain view.

Under ``torch.compile`` (``compiling.py``): a ``_BatchNorm`` layer says who
it is while Dynamo traces it, and :func:`decide` routes its call once, at
trace time; a synchronized call compiles to ``compiled.compiled_batch_norm``.
``F.batch_norm`` reached otherwise is one operator to the compiler, traced on
fake tensors: a call of it that would have to synchronize raises a clear error
instead of compiling to per-slice statistics; any other is PyTorch's own.
"""
from __future__ import annotations

import enum
import functools
import inspect
import sys
import threading
from _thread import get_ident as _get_ident
from typing import Any, Callable, NamedTuple, NoReturn, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import compiling, functional, naming, private_api, replicas, report, settings
from .distributed import ProcessGroupTransport, usable_group
from .errors import CheckpointRecomputeError, SyncBatchNormError
from .group import ReplicaGroup, contribution
from .moments import local_moments, update_running_stats
from .replicas import EXCLUDED_ATTRIBUTE, EXPLICIT_ATTRIBUTE, SEAT
from .wrapping import Patch

_getframe = sys._getframe
_functorch_active = private_api.functorch_transforms_active
_SELF = ("self",)
_MAIN_THREAD = threading.main_thread()
_MAIN_IDENT = _MAIN_THREAD.ident
_saved_tensor_hooks = private_api.top_saved_tensors_hooks
_EXPLICIT = object()  # batch_norm's ``instance`` when autosyncbn's own layer calls it


class BatchNormCall(NamedTuple):
    """One training-mode batch-statistics call: ``F.batch_norm``'s arguments, who makes it, where."""

    args: tuple  # input, running_mean, running_var, weight, bias, training, momentum, eps
    owner: Optional[nn.Module]
    group: Optional[ReplicaGroup] = None  # the DataParallel forward it belongs to
    replica: int = -1
    layer: int = -1  # the owner's index in its replica's module tree (-1: no module of the replica)


class To(enum.Enum):
    """Where a training-mode call goes."""

    PYTORCH = "PyTorch's own call, per slice"
    REPLICAS = "synchronized across the DataParallel replicas"
    PROCESSES = "synchronized across the process group"


_PYTORCH = To.PYTORCH  # read at every call: a module global, not an enum lookup


class Route(NamedTuple):
    """Where a call goes (``to``), why, and over which process group (``To.PROCESSES``)."""

    to: To
    reason: str
    group: Any = None


def nothing_to_synchronize() -> bool:
    """True when no training call made now, in this thread, can synchronize with anything.

    No DataParallel forward is registered (or still recomputable), no
    ``install(distributed=True)`` holds, no ``sync_report`` records, and this is
    the main thread, where no replica runs. ``F.batch_norm``'s patch returns to
    PyTorch's call at once when this holds, before looking for the calling
    module; :func:`decide` answers the same for such a call, without a warning.
    (autosyncbn's own layers do not ask: their process group may synchronize them.)
    """
    return (not replicas.LIVE[0] and settings.DISTRIBUTED is None and not report.OPEN
            and _get_ident() == _MAIN_IDENT)


def decide(call: BatchNormCall) -> Route:
    """Route one training-mode call. The only place that decides (see the module docstring)."""
    owner, group = call.owner, call.group
    explicit = _is_explicit(owner)
    if group is None and not explicit and nothing_to_synchronize():
        return Route(_PYTORCH, "nothing to synchronize with")
    if group is not None:
        plan = group.plan
        if group.num_replicas == 1:
            return Route(_PYTORCH, "a single replica: one device")
        if (explicit or plan.distributed) and usable_group(_process_group(owner, explicit, plan)) is not None:
            raise SyncBatchNormError(
                f"BatchNorm layer '{_name(call)}' runs in a DataParallel replica inside a process group of "
                f"2+ ranks: autosyncbn synchronizes across the replicas of one process or across "
                f"processes, not both at once. Use one process per GPU (DistributedDataParallel), "
                f"or leave out install(distributed=True) to synchronize within each process only.")
        if _excluded(owner, call, plan.exclude):
            return Route(_PYTORCH, "excluded")
        if not (plan.include_plain or explicit):
            name = _name(call)
            report.warn_once(
                f"explicit:{name}",
                f"BatchNorm layer '{name}' ({type(owner).__name__}) called F.batch_norm in a "
                f"DataParallelWithCallback replica, which synchronizes autosyncbn's own layers only: it "
                f"normalized per slice. autosyncbn.install() synchronizes every BatchNorm call; "
                f"convert_model() converts every _BatchNorm layer.")
            return Route(_PYTORCH, "a plain layer under the explicit API (install() synchronizes it)")
        return Route(To.REPLICAS, f"{group.num_replicas} replicas")
    options = settings.current()
    distributed = options is not None and options.distributed
    if owner is not None and owner.__dict__.get("_is_replica", False) and (explicit or settings.active()):
        if _excluded(owner, call, None):
            return Route(_PYTORCH, "excluded")
        name = _name(call)
        cause = ("its DataParallel is neither a DataParallelWithCallback nor patched by "
                 "patch_replication_callback(), and install() is off" if explicit and not settings.active() else
                 "the replicas were made before install(), or by code that does not call "
                 "torch.nn.parallel.replicate")
        report.warn_once(f"unprepared:{name}",
                         f"BatchNorm layer '{name}' ran in a DataParallel replica that autosyncbn did not "
                         f"register: {cause}. It normalized per slice.")
        return Route(_PYTORCH, "replica not registered by autosyncbn")
    if explicit or distributed:
        group = usable_group(_process_group(owner, explicit, options))
        if group is None:
            return Route(_PYTORCH, "no process group of 2+ ranks")
        # As nn.SyncBatchNorm: a module in eval mode (batch statistics without running
        # ones) stays local, so one rank may evaluate alone without a collective.
        if owner is not None and not owner.training:
            return Route(_PYTORCH, "eval mode: stays local, as nn.SyncBatchNorm")
        if _excluded(owner, call, None if explicit else options.exclude):  # type: ignore[union-attr]
            return Route(_PYTORCH, "excluded")
        return Route(To.PROCESSES, f"process group of {torch.distributed.get_world_size(group)}", group)
    if owner is None and replicas.live_groups() and threading.current_thread() is not _MAIN_THREAD:
        report.warn_once(
            f"unattributed:{threading.current_thread().name}",
            "F.batch_norm was called in training mode outside any module, in a thread that runs no "
            "DataParallel replica, while a synchronized forward runs (a thread pool inside a replica?): "
            "autosyncbn cannot tell which replica it belongs to, so it normalized per slice.")
    return Route(_PYTORCH, "not in a DataParallel replica")


def _is_explicit(owner: Optional[nn.Module]) -> bool:
    return owner is not None and bool(getattr(type(owner), EXPLICIT_ATTRIBUTE, False)
                                      or owner.__dict__.get(EXPLICIT_ATTRIBUTE, False))


def _process_group(owner: Optional[nn.Module], explicit: bool, options: Any) -> Any:
    """An autosyncbn layer's own group, else the one of ``install(distributed=True, process_group=...)``."""
    group = getattr(owner, "process_group", None) if explicit else None
    return group if group is not None or options is None else options.process_group


def _excluded(owner: Optional[nn.Module], call: BatchNormCall, exclude: Optional[Callable]) -> bool:
    if owner is None:
        return False
    if owner.__dict__.get(EXCLUDED_ATTRIBUTE, False):
        return True
    return exclude is not None and bool(exclude(_name(call), owner))


def _name(call: BatchNormCall) -> str:
    if call.group is not None and call.layer >= 0:
        return call.group.layer_name(call.layer)
    return naming.qualified_name(call.owner)


# -- the entry point: F.batch_norm's patch, and autosyncbn's own layers -----------------
def batch_norm(wrapped: Callable[..., Tensor], instance: Any, args: tuple, kwargs: dict) -> Tensor:
    """``F.batch_norm`` whose batch statistics are synchronized where :func:`decide` says so.

    A wrapt wrapper: ``wrapped`` is PyTorch's ``F.batch_norm`` (``instance`` is
    ``_EXPLICIT`` when autosyncbn's own layer calls). Written for the count of
    steps it takes: this runs for every BatchNorm call.
    """
    if kwargs or len(args) != 8:
        args = _positional(*args, **kwargs)
    if not args[5]:  # training=False: running statistics
        if report.OPEN:
            _record(args, None, Route(_PYTORCH, "eval mode: running statistics"))
        return wrapped(*args)
    if instance is not _EXPLICIT and nothing_to_synchronize():
        return wrapped(*args)
    frame = _getframe(1)
    while frame.f_globals is _GLOBALS:  # explicit_batch_norm
        frame = frame.f_back  # type: ignore[assignment]  # its caller is there
    owner = frame.f_locals.get("self") if frame.f_code.co_varnames[:1] == _SELF else None
    if type(args[0]) is not Tensor:
        return _tensor_subclass(wrapped, args, owner if isinstance(owner, nn.Module) else None)
    if not isinstance(owner, nn.Module):
        return _without_seat(wrapped, args, None)
    seat = owner.__dict__.get(SEAT)
    if seat is not None:
        return _in_replica(wrapped, args, owner, *seat)
    return _without_seat(wrapped, args, owner)


def _in_replica(wrapped: Callable[..., Tensor], args: tuple, owner: Optional[nn.Module], group: ReplicaGroup,
                replica: int, layer: int) -> Tensor:
    """A call made in replica ``replica`` of ``group`` by its layer number ``layer`` (-1: no module of it)."""
    route = group.routes.get(layer)
    if route is None:
        route = decide(BatchNormCall(args, owner, group, replica, layer))
        if layer >= 0:
            group.routes[layer] = route
    if replica == 0:
        group.seen.add(id(args[1]))  # its running_mean: this layer's statistics reached autosyncbn
    if route.to is _PYTORCH:
        if report.OPEN:
            _record(args, owner, route, group, replica, layer)
        return wrapped(*args)
    if group.done[replica]:
        return _replay(args, owner, group, replica, layer)
    if _functorch_active():
        raise SyncBatchNormError(
            f"BatchNorm layer '{group.layer_name(layer)}' ran under a torch.func transform (vmap, grad, "
            f"jacrev, ...) in DataParallel replica {replica}: autosyncbn cannot synchronize a "
            f"transformed call across replicas. Exclude the layer (autosyncbn.exclude) to run it per slice.")
    input, running_mean, running_var, weight, bias, _, momentum, eps = args
    functional.check_arguments(input, running_mean, running_var, weight, bias, momentum, eps)
    channels = input.shape[1]
    hooks = _saved_tensor_hooks(False)
    packed = None if hooks is None else functional.pack_part(hooks, input, weight)
    moments = local_moments(input)
    number = group.calls[replica]
    group.calls[replica] = number + 1
    layer_call, outputs = group.meet(replica, number, contribution((
        layer, channels, input.numel() // channels if channels else 0, moments, input, weight, bias, eps, packed)))
    if layer_call.total == 1:
        _raise_one_value(layer_call, input)
    if replica == 0 and layer_call.total > 0:  # replica 0's buffers are the base module's
        update_running_stats(running_mean, running_var, layer_call.merged[0], layer_call.merged[1],
                             layer_call.total, float(momentum))
    if packed is not None:  # under checkpointing this call may be recomputed: keep its statistics
        group.recorded.setdefault((replica, layer), []).append((moments, layer_call))
    if report.OPEN:
        _record(args, owner, route, group, replica, layer)
    return functional.normalize_part(layer_call, outputs[replica], input, weight, bias)


def _replay(args: tuple, owner: Optional[nn.Module], group: ReplicaGroup, replica: int, layer: int) -> Tensor:
    """A synchronized call made again after its replica's forward ended: activation checkpointing
    recomputes it (in backward, in whatever thread autograd runs it).

    It reproduces its forward exactly: the whole-batch statistics of the call it
    recomputes are replayed, never met again, so it waits for no peer. Replica 0
    updates the running statistics again, as PyTorch's kernel does in a
    recompute, before packing its input (where a non-reentrant recompute may stop).
    """
    input, running_mean, running_var, weight, bias, _, momentum, _eps = args
    recorded = group.recorded.get((replica, layer))
    if not recorded:
        _raise_recompute(group, replica, layer, owner)
    if len(recorded) == 1:
        layer_call = recorded[0][1]
    else:  # a layer called several times in one forward: the call whose slice this is (mean and variance)
        mean, var = local_moments(input)
        layer_call = min(recorded, key=lambda entry: float(
            (entry[0][0] - mean).abs().max() + (entry[0][1] - var).abs().max()))[1]
    if replica == 0 and layer_call.total > 0:
        update_running_stats(running_mean, running_var, layer_call.merged[0], layer_call.merged[1],
                             layer_call.total, float(momentum))
    output, = functional.normalize(layer_call, (input,), (weight,), (bias,), _packed_alone(input, weight))
    if report.OPEN:
        _record(args, owner, Route(To.REPLICAS, "recomputed (activation checkpointing): replayed"), group,
                replica, layer)
    return functional.normalize_part(layer_call, output, input, weight, bias)


def _tensor_subclass(wrapped: Callable[..., Tensor], args: tuple, owner: Optional[nn.Module]) -> Tensor:
    """An input that is a tensor subclass (MONAI's ``MetaTensor``), or a fake tensor being traced.

    As ``F.batch_norm`` does, the subclass's ``__torch_function__`` gets the
    call first and calls back with torch functions disabled; the statistics are
    then computed on a plain view of the input (same memory, same graph), and
    the subclass wraps the plain output as it wraps PyTorch's.
    """
    input = args[0]
    if _tracing(input):
        # torch.compile treats F.batch_norm as one operator: it runs this on fake
        # tensors to trace it, and the compiled graph never calls it again.
        if _may_synchronize(owner):
            raise SyncBatchNormError(_COMPILE_MESSAGE)
        return wrapped(*args)
    if owner is None:
        owner = naming.calling_module()
    plain = functools.partial(_on_plain_input, wrapped, owner)
    if has_torch_function_variadic(*args[:5]):
        return handle_torch_function(plain, args[:5], *args)
    return plain(*args)


def _on_plain_input(wrapped: Callable[..., Tensor], owner: Optional[nn.Module], *args: Any) -> Tensor:
    args = (args[0].as_subclass(Tensor) if type(args[0]) is not Tensor else args[0], *args[1:])
    seat = owner.__dict__.get(SEAT) if owner is not None else None
    if seat is not None:
        return _in_replica(wrapped, args, owner, *seat)
    return _without_seat(wrapped, args, owner)


def _without_seat(wrapped: Callable[..., Tensor], args: tuple, owner: Optional[nn.Module]) -> Tensor:
    """A call whose calling frame is no module of a registered replica."""
    if owner is None:
        owner = naming.calling_module()  # a function called F.batch_norm: the module above it
    seat = owner.__dict__.get(SEAT) if owner is not None else None
    if seat is not None:
        return _in_replica(wrapped, args, owner, *seat)
    running = replicas.running_replica()
    if running is not None:  # a module outside the replicated tree, or no module at all
        return _in_replica(wrapped, args, owner, *running, -1)
    route = decide(BatchNormCall(args, owner))
    if report.OPEN:
        _record(args, owner, route)
    if route.to is _PYTORCH:
        return wrapped(*args)
    return _over_processes(args, owner, route.group)


def _over_processes(args: tuple, owner: Optional[nn.Module], group: Any) -> Tensor:
    """``F.batch_norm(..., training=True)`` with statistics merged over a process group."""
    input, running_mean, running_var, weight, bias, _, momentum, eps = args
    functional.check_arguments(input, running_mean, running_var, weight, bias, momentum, eps)
    channels = input.shape[1]
    transport = ProcessGroupTransport(group, naming.qualified_name(owner))
    layer_call = functional.merge_over(transport, input, input.numel() // channels if channels else 0,
                                       local_moments(input), eps)
    if layer_call.total == 1:
        _raise_one_value(layer_call, input)
    # Running statistics before the input is saved: torch.utils.checkpoint's recompute
    # stops once the saved tensors are back, as it does after PyTorch's own kernel.
    if layer_call.total > 0:  # an empty whole batch leaves them, as PyTorch does
        update_running_stats(running_mean, running_var, layer_call.merged[0], layer_call.merged[1],
                             layer_call.total, float(momentum))
    output, = functional.normalize(layer_call, (input,), (weight,), (bias,), _packed_alone(input, weight))
    return functional.normalize_part(layer_call, output, input, weight, bias)


def _packed_alone(input: Tensor, weight: Optional[Tensor]) -> Optional[list]:
    """A node's one part packed with this thread's saved-tensor hooks, if any (see functional.pack_part)."""
    hooks = _saved_tensor_hooks(False)
    return None if hooks is None else [functional.pack_part(hooks, input, weight)]


def _raise_one_value(call: functional.LayerCall, input: Tensor) -> NoReturn:
    raise ValueError(
        f"Expected more than 1 value per channel when training, got {call.total} value(s) per "
        f"channel over the whole batch (input size of this part {list(input.shape)})")


def _raise_recompute(group: ReplicaGroup, replica: int, layer: int, owner: Optional[nn.Module]) -> NoReturn:
    name = group.layer_name(layer) if layer >= 0 else naming.qualified_name(owner)
    raise CheckpointRecomputeError(
        f"BatchNorm layer '{name}' ran in replica {replica} after that replica's forward had ended, "
        f"but not as a recompute of a call it made under torch.utils.checkpoint (a replica module "
        f"called again, or kept and called after the step?): its peers cannot meet it any more. "
        f"Call the DataParallel, not its replicas.")


_SIGNATURE = inspect.signature(F.batch_norm)


def _positional(*args: Any, **kwargs: Any) -> tuple:
    """``F.batch_norm``'s eight arguments in order, its defaults filled in."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _record(args: tuple, owner: Optional[nn.Module], route: Route, group: Optional[ReplicaGroup] = None,
            replica: int = -1, layer: int = -1) -> None:
    if owner is None:
        owner = naming.calling_module()
    name = _name(BatchNormCall(args, owner, group, replica, layer))
    report.record(name, route.to is not _PYTORCH, route.reason, replica if group is not None else None)


# -- torch.compile ------------------------------------------------------------------------
def _tracing(input: Any) -> bool:
    return private_api.is_fake(input)


def _may_synchronize(owner: Optional[nn.Module]) -> bool:
    """At trace time: could this call synchronize when it runs? Reads nothing a tracer cannot."""
    if replicas.running_replica() is not None or (owner is not None and SEAT in owner.__dict__):
        return True
    options = settings.distributed_anywhere()
    explicit = _is_explicit(owner)
    return (explicit or options is not None) and usable_group(_process_group(owner, explicit, options)) is not None


_COMPILE_MESSAGE = (
    "torch.compile is tracing a BatchNorm call that autosyncbn must synchronize but cannot place "
    "in the compiled graph, which would normalize it per slice: it comes from a module that is no "
    "torch.nn.modules.batchnorm._BatchNorm subclass, from a BatchNorm layer with hooks, from outside any "
    "module, or from a DataParallel replica. Make the layer a _BatchNorm subclass (or convert it: "
    "autosyncbn.convert_model), remove its hooks, or keep that module out of the graph, "
    "module.forward = torch.compiler.disable(module.forward): it then synchronizes as in eager mode.")


# -- the patch of torch.nn.functional.batch_norm, and autosyncbn's own layers -----------
FUNCTIONAL_BATCH_NORM = Patch(F, "batch_norm", wrapper=batch_norm)
"""The patch of ``torch.nn.functional.batch_norm`` that ``install()`` applies."""

PLAIN_BATCH_NORM = F.batch_norm
"""PyTorch's own ``F.batch_norm`` (autosyncbn is imported before anything patches it)."""


def explicit_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                        momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm`` as autosyncbn's own layers call it: decided here, with or without ``install()``.

    TorchScript compiles PyTorch's own call (a scripted layer never synchronizes).
    """
    if torch.jit.is_scripting():
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _explicit_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


@torch.jit.unused
def _explicit_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                         eps: float) -> Tensor:
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    if torch.compiler.is_compiling():  # the compiled graph's own call (compiling.py)
        output = compiling.batch_norm_when_compiled(*args)
        return _eagerly()(*args) if output is None else output
    return batch_norm(PLAIN_BATCH_NORM, _EXPLICIT, args, {})


@functools.cache
def _eagerly() -> Callable[..., Tensor]:
    """:func:`batch_norm` behind a graph break (made on first use: only compiling code needs it)."""
    return torch.compiler.disable(lambda *args: batch_norm(PLAIN_BATCH_NORM, _EXPLICIT, args, {}), recursive=True)


_GLOBALS = globals()
