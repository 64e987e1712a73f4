"""Synchronized BatchNorm over a process group that ``torch.compile(fullgraph=True)`` keeps in one graph.

The exchange is two PyTorch operators, registered when this module is first
imported (only compiling code imports it, so ``import autosyncbn`` stays cheap):

``autosyncbn::sync_moments(local, count, group_name, layer) -> (merged, total, call)``
    this rank's float64 (mean, biased var) and value count in; every rank's,
    gathered in one fixed-size record by :class:`~autosyncbn.distributed.ProcessGroupTransport`
    (its header checks that ranks agree: layer, channels, call number) and
    merged by Chan's formula (``moments.chan_merge``), out: the whole batch's
    (2, C) moments, its value count and the transport's call number;
``autosyncbn::sum_over_ranks(grad, call, group_name, layer) -> summed``
    the backward of ``sync_moments``: a (2, C) gradient summed over the ranks
    by the same transport, its header carrying the forward's call number.

Every rank merges the same moments, so the gradient of the merged moments
summed over the ranks, times the merge's Jacobian at this rank's moments, is
this rank's share: ``d mean / d mean_i = w_i``, ``d var / d var_i = w_i``,
``d var / d mean_i = 2 w_i (mean_i - mean)`` with ``w_i = n_i / N``. One
collective of 2 * C values per layer in backward, as in eager.

Everything else in :func:`compiled_batch_norm` is plain differentiable torch
code the compiler traces and autograd differentiates: local moments
(float64 mean, the variance accumulated as PyTorch's kernel does), the
normalization ``(x - mean) * rsqrt(var + eps) * weight + bias`` in the
accumulation dtype (float32 for half inputs), and the running statistics
(``lerp_`` with the unbiased variance, exactly as ``moments.update_running_stats``).
A whole batch with one value per channel raises PyTorch's ``ValueError`` on
every rank from inside ``sync_moments`` (every rank sees every count).

Compiled layers reach :func:`compiled_batch_norm` through ``compiling.py``.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import ProcessGroupTransport
from .eps_mode import get_sbn_eps_mode
from .errors import SyncBatchNormError
from .functional import SECOND_BACKWARD_MESSAGE
from .moments import chan_merge
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
    schema="(Tensor local, SymInt count, str group_name, str layer) -> (Tensor, Tensor, Tensor)")
def _sync_moments(local: Tensor, count: int, group_name: str, layer: str) -> tuple[Tensor, Tensor, Tensor]:
    transport = ProcessGroupTransport(_group(group_name), layer)
    counts, gathered = transport.gather(int(count), local[0], local[1])
    total = sum(counts)
    if total == 1:  # every rank sees every count: every rank raises here
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {total} value(s) per channel over "
            f"the whole batch (this rank's part has {count}; layer '{layer}')")
    merged = chan_merge(tuple(counts), gathered.to(local.device))
    return (merged, torch.tensor(float(total), dtype=torch.float64, device=local.device),
            torch.tensor(transport.call, dtype=torch.int64))


@_sync_moments.register_fake
def _(local: Tensor, count: int, group_name: str, layer: str) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty_like(local), local.new_empty((), dtype=torch.float64),
            torch.empty((), dtype=torch.int64))


@torch.library.custom_op(
    "autosyncbn::sum_over_ranks", mutates_args=(),
    schema="(Tensor grad, Tensor call, str group_name, str layer) -> Tensor")
def _sum_over_ranks(grad: Tensor, call: Tensor, group_name: str, layer: str) -> Tensor:
    transport = ProcessGroupTransport.resume(_group(group_name), layer, int(call), grad.shape[1])
    return transport.sum_gradients(grad.double()).to(device=grad.device, dtype=grad.dtype)


@_sum_over_ranks.register_fake
def _(grad: Tensor, call: Tensor, group_name: str, layer: str) -> Tensor:
    return torch.empty_like(grad)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    local, count, group_name, layer = inputs
    merged, total, call = output
    ctx.save_for_backward(local, merged, total, call)
    ctx.count, ctx.group_name, ctx.layer = count, group_name, layer


def _backward(ctx: Any, grad_merged: Optional[Tensor], _total: Any, _call: Any) -> tuple:
    local, merged, total, call = ctx.saved_tensors
    if grad_merged is None:  # every rank still meets in the collective
        grad_merged = torch.zeros_like(merged)
    summed = torch.ops.autosyncbn.sum_over_ranks(grad_merged, call, ctx.group_name, ctx.layer)
    weight = ctx.count / total.clamp(min=1.0)  # n_i / N (0 for an empty part)
    grad_mean = weight * (summed[0] + 2.0 * (local[0] - merged[0]) * summed[1])
    return torch.stack([grad_mean, weight * summed[1]]), None, None, None


def _no_double_backward(ctx: Any, grad: Tensor) -> tuple:
    raise SyncBatchNormError(SECOND_BACKWARD_MESSAGE)


_sync_moments.register_autograd(_backward, setup_context=_setup_context)
_sum_over_ranks.register_autograd(_no_double_backward)


# -- the layer call -------------------------------------------------------------------------------
def compiled_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor], bias: Optional[Tensor], momentum: Union[float, Tensor],
                        eps: float, group: Union[str, Any], layer: str) -> Tensor:
    """``F.batch_norm(..., training=True)`` with the whole batch's statistics over ``group``.

    Traceable by ``torch.compile(fullgraph=True)``: ``group`` (a process group, or
    its name) and ``layer`` (the layer's qualified name, the same on every rank)
    are constants of the graph.
    Runs eagerly as well (the operators have their autograd). ``momentum``
    is the factor ``F.batch_norm`` takes (``_BatchNorm`` resolves ``None``).
    """
    channels = input.shape[1]
    count = input.numel() // channels if channels else 0
    dims = [0, *range(2, input.dim())]
    shape = [1, channels] + [1] * (input.dim() - 2)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32  # the accumulation dtype
    x = input if input.dtype == dtype else input.to(dtype)
    if count:
        # Moments of x minus one of its values per channel (the shifted-data algorithm): a large mean
        # and a small spread lose nothing, in the values or in their gradient, and the float64 mean
        # is that value plus a small mean.
        shift = x.detach()[0].reshape(channels, -1)[:, 0]  # the first sample's first value
        var, mean = torch.var_mean(x - shift.view(shape), dims, correction=0)
        mean, var = mean.double() + shift.double(), var.double()
    else:  # zeros, still connected to the input: this rank's backward meets its peers'
        mean = var = input.sum(dims, dtype=torch.float64)
    merged, total, _call = torch.ops.autosyncbn.sync_moments(
        torch.stack([mean, var]), count, group if isinstance(group, str) else group.group_name, layer)
    batch_mean, batch_var = merged[0].to(dtype), merged[1].to(dtype)
    centered = x - batch_mean.view(shape)
    if dtype != torch.float64:
        # The mean's float32 rounding (1e-3 at a mean of 3e4) would shift every output: subtract
        # the rest too. x - batch_mean is exact where it matters (x close to the mean).
        centered = centered - (merged[0] - batch_mean.double()).to(dtype).view(shape)
    if get_sbn_eps_mode() == "clamp":  # the classic rule: 1 / sqrt(max(var, eps))
        invstd = batch_var.clamp(min=eps).rsqrt()
    else:
        invstd = (batch_var + eps).rsqrt()
    output = centered * invstd.view(shape)
    if weight is not None:
        output = output * weight.to(dtype).view(shape)
    if bias is not None:
        output = output + bias.to(dtype).view(shape)
    with torch.no_grad():
        stats = merged.detach()
        if running_mean is not None:
            _lerp(running_mean, stats[0], momentum, total, count)
        if running_var is not None:
            _lerp(running_var, stats[1] * (total / (total - 1.0)), momentum, total, count)
    return output if output.dtype == input.dtype else output.to(input.dtype)


def _lerp(running: Tensor, batch: Tensor, momentum: Union[float, Tensor], total: Tensor, count: int) -> None:
    """``running.lerp_(batch, momentum)``; an empty whole batch leaves it (possible only if this part is empty)."""
    if count:
        running.lerp_(batch.to(running.dtype), momentum)
    else:
        running.copy_(torch.where(total > 0, running.lerp(batch.to(running.dtype), momentum), running))
