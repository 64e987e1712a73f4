"""Synchronized BatchNorm over a process group that ``torch.compile(fullgraph=True)`` keeps in one graph.

The exchange is two PyTorch operators, registered when this module is first
imported (only compiling code imports it, so ``import autosyncbn`` stays cheap):

``autosyncbn::sync_moments(local, count, group_name, layer) -> (merged, total, call)``
    this rank's float64 (mean, biased var) and value count in; every rank's,
    gathered in one fixed-size record by :class:`~autosyncbn.distributed.ProcessGroupTransport`
    (its header checks that ranks agree: layer, channels, call number) and
    merged by Chan's formula (``moments.chan_merge``), out: the whole batch's
    (2, C) moments, its value count and the transport's call number;
``autosyncbn::normalize(x, weight, bias, merged, invstd, ...) -> y``
    ``(x - mean) * invstd * weight + bias`` in the accumulation dtype (float32
    for half inputs); its backward is
``autosyncbn::normalize_backward(grad, x, ...) -> (dx, local sums)``
    eager mode's one formula, ``dx = scale * (dy - sum(dy)/N - xhat *
    sum(dy xhat)/N)``, with this rank's (sum dy, sum dy * xhat) summed over the
    ranks by the same transport, its header carrying the forward's call number.
    Differentiating it raises (the sum crosses processes outside autograd).

The collectives send exactly what eager mode sends (``functional.merge_over``
and ``functional._gradients``), so a compiled rank and an eager one (a rank
past Dynamo's recompile limit runs eagerly) meet and compute the same numbers.
Local
moments (float64 mean, the variance accumulated as PyTorch's kernel does) and
the running statistics (``lerp_`` with the unbiased variance, exactly as
``moments.update_running_stats``) are plain code the compiler traces. A whole
batch with one value per channel raises PyTorch's ``ValueError`` on every
rank from inside ``sync_moments`` (every rank sees every count).

Compiled layers reach :func:`compiled_batch_norm` through ``compiling.py``.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional
from .distributed import ProcessGroupTransport
from .errors import SyncBatchNormError
from .functional import SECOND_BACKWARD_MESSAGE
from .moments import accumulation_dtype, local_moments
from .private_api import process_groups

# -- process groups by name: operators take strings ------------------------------------------------
_GROUPS: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


def remember_group(group: Any) -> str:
    """Make ``group`` findable by the operators (eagerly; a traced call would cost a recompile)."""
    name = group.group_name
    _GROUPS[name] = group
    return name


def _group(name: str) -> Any:
    """The live process group called ``name``: remembered, the world, or any group there is."""
    group = _GROUPS.get(name)
    if group is not None:
        return group
    for candidate in (dist.group.WORLD, *process_groups(dist.distributed_c10d)):
        if candidate is not None and candidate.group_name == name:
            _GROUPS[name] = candidate
            return candidate
    raise SyncBatchNormError(
        f"synchronized BatchNorm in a compiled graph: no process group named {name!r} exists now "
        f"(destroyed?). Call autosyncbn.compiled.remember_group(group) after making it.")


# -- the operators --------------------------------------------------------------------------------
@torch.library.custom_op(
    "autosyncbn::sync_moments", mutates_args=(),
    schema="(Tensor input, float eps, str group_name, str layer) -> (Tensor, Tensor, Tensor, Tensor)")
def _sync_moments(input: Tensor, eps: float, group_name: str, layer: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    channels = input.shape[1]
    count = input.numel() // channels if channels else 0
    transport = ProcessGroupTransport(_group(group_name), layer)
    call = functional.merge_over(transport, input, count, local_moments(input), eps)
    if call.total == 1:  # every rank sees every count: every rank raises here
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {call.total} value(s) per channel over "
            f"the whole batch (this rank's part has {count}; layer '{layer}')")
    return (call.merged, torch.tensor(float(call.total), dtype=torch.float64),
            torch.tensor(transport.call, dtype=torch.int64), torch.tensor(call.wide))


@_sync_moments.register_fake
def _(input: Tensor, eps: float, group_name: str, layer: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (input.new_empty((2, input.shape[1]), dtype=torch.float64), input.new_empty((), dtype=torch.float64),
            torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.bool))


def _layer_call(input: Tensor, merged: Tensor, total: Tensor, wide: Tensor, eps: float,
                transport: Optional[ProcessGroupTransport] = None) -> functional.LayerCall:
    return functional.LayerCall(merged, int(total), eps, accumulation_dtype(input.dtype), transport, bool(wide))


@torch.library.custom_op(
    "autosyncbn::normalize", mutates_args=(),
    schema="(Tensor input, Tensor? weight, Tensor? bias, Tensor merged, Tensor total, Tensor call, Tensor wide, "
           "float eps, str group_name, str layer) -> Tensor")
def _normalize(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], merged: Tensor, total: Tensor,
               call: Tensor, wide: Tensor, eps: float, group_name: str, layer: str) -> Tensor:
    return functional.normalize_part(_layer_call(input, merged, total, wide, eps), torch.empty_like(input), input,
                                     weight, bias)


@_normalize.register_fake
def _(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], merged: Tensor, total: Tensor,
      call: Tensor, wide: Tensor, eps: float, group_name: str, layer: str) -> Tensor:
    return torch.empty_like(input)


@torch.library.custom_op(
    "autosyncbn::normalize_backward", mutates_args=(),
    schema="(Tensor grad, Tensor input, Tensor? weight, Tensor merged, Tensor total, Tensor call, Tensor wide, "
           "float eps, str group_name, str layer) -> (Tensor, Tensor)")
def _normalize_backward(grad: Tensor, input: Tensor, weight: Optional[Tensor], merged: Tensor, total: Tensor,
                        call: Tensor, wide: Tensor, eps: float, group_name: str, layer: str) -> tuple[Tensor, Tensor]:
    """(dx, this rank's (sum dy, sum dy * xhat)): eager mode's formula and collective, by eager mode's code."""
    transport = ProcessGroupTransport.resume(_group(group_name), layer, int(call), input.shape[1])
    layer_call = _layer_call(input, merged, total, wide, eps, transport)
    grad_input, sum_dy_xhat, sum_dy = functional.part_gradients(layer_call, input, weight, grad)
    return grad_input, torch.stack([sum_dy, sum_dy_xhat])


@_normalize_backward.register_fake
def _(grad: Tensor, input: Tensor, weight: Optional[Tensor], merged: Tensor, total: Tensor, call: Tensor,
      wide: Tensor, eps: float, group_name: str, layer: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(input), input.new_empty((2, input.shape[1]), dtype=accumulation_dtype(input.dtype))


def _setup_normalize(ctx: Any, inputs: tuple, output: Tensor) -> None:
    input, weight, bias, merged, total, call, wide, eps, group_name, layer = inputs
    ctx.save_for_backward(input, weight, merged, total, call, wide)
    ctx.eps, ctx.group_name, ctx.layer = eps, group_name, layer
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_normalize(ctx: Any, grad: Tensor) -> tuple:
    input, weight, merged, total, call, wide = ctx.saved_tensors
    grad_input, sums = torch.ops.autosyncbn.normalize_backward(grad, input, weight, merged, total, call, wide,
                                                               ctx.eps, ctx.group_name, ctx.layer)
    grad_weight = None if weight is None else sums[1].to(weight.dtype)
    grad_bias = None if ctx.bias_dtype is None else sums[0].to(ctx.bias_dtype)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _no_double_backward(ctx: Any, *grads: Any) -> tuple:
    raise SyncBatchNormError(SECOND_BACKWARD_MESSAGE)


_normalize.register_autograd(_backward_normalize, setup_context=_setup_normalize)
_normalize_backward.register_autograd(_no_double_backward)


# -- the layer call -------------------------------------------------------------------------------
def compiled_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor], bias: Optional[Tensor], momentum: Union[float, Tensor],
                        eps: float, group: Union[str, Any], layer: str) -> Tensor:
    """``F.batch_norm(..., training=True)`` with the whole batch's statistics over ``group``.

    Traceable by ``torch.compile(fullgraph=True)``: ``group`` (a process group, or
    its name) and ``layer`` (the layer's qualified name, the same on every rank)
    are constants of the graph. Runs eagerly as well (the operators have their
    autograd). ``momentum`` is the factor ``F.batch_norm`` takes (``_BatchNorm``
    resolves ``None``).
    """
    channels = input.shape[1]
    count = input.numel() // channels if channels else 0
    group_name = group if isinstance(group, str) else group.group_name
    merged, total, call, wide = torch.ops.autosyncbn.sync_moments(input.detach(), eps, group_name, layer)
    output = torch.ops.autosyncbn.normalize(input, weight, bias, merged, total, call, wide, eps, group_name, layer)
    with torch.no_grad():
        if running_mean is not None:
            _lerp(running_mean, merged[0], momentum, total, count)
        if running_var is not None:
            _lerp(running_var, merged[1] * (total / (total - 1.0)), momentum, total, count)
    return output


def _lerp(running: Tensor, batch: Tensor, momentum: Union[float, Tensor], total: Tensor, count: int) -> None:
    """``running.lerp_(batch, momentum)``; an empty whole batch leaves it (possible only if this part is empty)."""
    if count:
        running.lerp_(batch.to(running.dtype), momentum)
    else:
        running.copy_(torch.where(total > 0, running.lerp(batch.to(running.dtype), momentum), running))
