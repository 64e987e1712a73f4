"""BatchNorm layers under ``torch.compile``: who makes the call, and what the compiled graph holds.

In eager mode ``dispatch`` finds the module making a batch-statistics call in
the calling frame. Dynamo runs no frames while it traces, so under
``torch.compile`` the layer says who it is: the ``_call_impl`` of autosyncbn's
own layers, and of every ``_BatchNorm`` while ``install(distributed=True)``
holds (:func:`call_impl`), puts the module in :data:`CALLING` around its forward, a side effect Dynamo traces in
order; the forward's ``F.batch_norm`` is ``dispatch.explicit_batch_norm``
(the layer's forward as ``modules`` synchronizes it), which reads it there
(:func:`batch_norm_when_compiled`).

What the call becomes is decided once, while Dynamo traces, by plain Python:
:func:`route_when_compiled` is marked for Dynamo the way
``torch.compiler.assume_constant_result`` marks a function (it runs at trace
time, with the real module, guarded by its identity; the answer is a constant
of the graph). The answer is ``dispatch.decide``'s: PyTorch's own
``batch_norm``, or ``compiled.compiled_batch_norm`` over the process group,
whose exchange is two custom operators the graph keeps (no graph break,
``fullgraph=True`` works). A call that would synchronize DataParallel replicas
raises :data:`IN_REPLICAS_MESSAGE`: each replica thread runs its own compiled
graph, whose autograd cannot hold the one node per layer that spans the
replicas.

In eager mode :func:`call_impl` is PyTorch's own fast path (no hook: the
forward at once; else ``nn.Module._call_impl``), so it costs no Python call
more than PyTorch's, except one test for Dynamo in autosyncbn's layers.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from . import settings
from .errors import SyncBatchNormError
from .replicas import EXCLUDED_ATTRIBUTE, SEAT

CALLING: list = [None]
"""The BatchNorm module whose forward Dynamo traces now (None in eager mode, and after it)."""

_MODULE_CALL_IMPL = nn.Module._call_impl
_PLAIN_BATCH_NORM = F.batch_norm  # PyTorch's own (autosyncbn is imported before anything patches it)
_tracing_state = torch._C._get_tracing_state
_dynamo_compiling: Callable[[], bool] = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


ROUTED_ALWAYS: set = set()
"""autosyncbn's layer classes (added as they are made): routed under ``torch.compile`` even
without ``distributed=True``, since their process group may synchronize them."""


def call_impl(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``nn.Module._call_impl`` of autosyncbn's layers, and of every ``_BatchNorm`` under ``install()``.

    PyTorch's fast path (no hook: the forward at once), its own ``_call_impl``
    otherwise; under ``torch.compile``, a layer that may synchronize says who it
    is (:func:`_compiled_call`). No Python call more than PyTorch's, except the
    test for Dynamo made by autosyncbn's layers and under ``distributed=True``.
    """
    hooked = (self._backward_hooks or self._backward_pre_hooks or self._forward_hooks or self._forward_pre_hooks
              or _torch_module._global_backward_pre_hooks or _torch_module._global_backward_hooks
              or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
              or _tracing_state())
    if (settings.DISTRIBUTED is not None or type(self) in ROUTED_ALWAYS) and _dynamo_compiling():
        return _compiled_call(self, bool(hooked), args, kwargs)
    return _MODULE_CALL_IMPL(self, *args, **kwargs) if hooked else self.forward(*args, **kwargs)


def _compiled_call(module: nn.Module, hooked: bool, args: tuple, kwargs: dict) -> Any:
    """Traced by Dynamo: ``module``'s call, with :data:`CALLING` naming it while its forward runs.

    autosyncbn's layers, a layer with hooks and a forward set on the instance
    run as PyTorch runs them (a plain layer's own forward then meets the
    refusal in ``dispatch``); any other runs its class's forward with
    autosyncbn's ``F.batch_norm``.
    """
    previous = CALLING[0]
    CALLING[0] = module
    try:
        if hooked or type(module) in ROUTED_ALWAYS or "forward" in module.__dict__:
            return _MODULE_CALL_IMPL(module, *args, **kwargs)
        return getattr(FORWARDS, forward_when_compiled(type(module)))(module, *args, **kwargs)
    finally:
        CALLING[0] = previous


def batch_norm_when_compiled(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                             weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                             momentum: Any, eps: float) -> Optional[Tensor]:
    """Traced by Dynamo: ``F.batch_norm`` of the layer in :data:`CALLING`. None: no layer says who
    it is (a forward called directly), so the caller runs it eagerly behind a graph break."""
    if not training:
        return _PLAIN_BATCH_NORM(input, running_mean, running_var, weight, bias, training, momentum, eps)
    owner = CALLING[0]
    if owner is None:
        return None
    # Read here, so that Dynamo guards them: a change of options or exclusion retraces the graph.
    route = route_when_compiled(owner, getattr(owner, EXCLUDED_ATTRIBUTE, False), settings.ROUTING)
    if route is None:
        return _pytorch_training_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps)
    from .compiled import compiled_batch_norm

    return compiled_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, *route)


def _pytorch_training_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                                 weight: Optional[Tensor], bias: Optional[Tensor], momentum: Any,
                                 eps: float) -> Tensor:
    """``F.batch_norm(..., training=True)`` as PyTorch computes it, by its checks and ``torch.batch_norm``.

    Not ``F.batch_norm`` itself: a compiled graph calls that by its name, which
    ``install()`` patches, so the graph's own trace would meet dispatch again
    without knowing the layer (and refuse, under ``distributed=True``).
    """
    size = input.shape
    values = size[0]
    for extent in size[2:]:
        values *= extent
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    return torch.batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps,
                            torch.backends.cudnn.enabled)


# -- decided at trace time, in plain Python ----------------------------------------------------------
def _constant_for_dynamo(function: Callable) -> Callable:
    """What ``torch.compiler.assume_constant_result`` does, without importing Dynamo (0.5 s) at import:
    Dynamo calls ``function`` while tracing (objects passed by identity, guarded) and keeps its answer
    as a constant. ``tests/test_compiled.py`` checks that the public decorator still sets the same mark."""
    function._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return function


@_constant_for_dynamo
def route_when_compiled(owner: nn.Module, excluded: bool, routing: int) -> Optional[tuple]:
    """Where a compiled training call of ``owner`` goes: None (PyTorch's own call), or
    ``(process group name, layer name)``. Raises where a graph cannot synchronize. (Strings only:
    Dynamo cannot guard a function made here.) ``excluded`` and ``routing`` (``settings.ROUTING``)
    are read from ``owner`` and ``settings`` by the traced caller, so Dynamo guards them."""
    from . import compiled, dispatch, naming

    seat = owner.__dict__.get(SEAT)
    route = dispatch.decide(dispatch.BatchNormCall((), owner, *seat) if seat else dispatch.BatchNormCall((), owner))
    if route.to is dispatch.To.PYTORCH:
        return None
    if route.to is dispatch.To.REPLICAS:
        raise SyncBatchNormError(IN_REPLICAS_MESSAGE.format(name=naming.qualified_name(owner)))
    return compiled.remember_group(route.group), naming.qualified_name(owner)


class _Forwards:
    """Each traced BatchNorm class's forward with autosyncbn's ``F.batch_norm``, an attribute each:
    read by the traced code from here, so Dynamo guards it as any function it reads."""


FORWARDS = _Forwards()


@_constant_for_dynamo
def forward_when_compiled(cls: type) -> str:
    """The name in :data:`FORWARDS` of ``cls``'s forward with autosyncbn's ``F.batch_norm`` (made
    on first use; autosyncbn's layers: their own forward)."""
    from . import modules

    name = f"{cls.__name__}_{id(cls):x}"  # an identifier (Dynamo reads it as an attribute)
    made = vars(FORWARDS).get(name)
    # Made anew where the class's forward is not the one it was made of: a class redefined where a
    # freed one was (same name, same id), or a forward replaced on the class.
    if made is None or getattr(made, "__wrapped__", made) is not modules.forward_of(cls):
        setattr(FORWARDS, name, modules.synchronized_forward(cls))
    return name


IN_REPLICAS_MESSAGE = (
    "torch.compile is tracing BatchNorm layer '{name}' inside DataParallel replicas that autosyncbn "
    "synchronizes: each replica thread runs its own compiled graph, which cannot hold the one autograd "
    "node per layer that spans the replicas, so it would normalize per slice. Compile the model inside "
    "one process per device instead (DistributedDataParallel: compiled synchronized BatchNorm works over "
    "process groups), or run the DataParallel model uncompiled.")
