"""The ``torch.distributed`` backend: synchronize BatchNorm across a process group.

Works on every backend PyTorch's collectives support: gloo on CPU (where
``torch.nn.SyncBatchNorm`` refuses to run) and NCCL on GPU.

Forward makes one all-gather of a fixed-size record per rank: a header (call
number, channel count, value count, layer fingerprint) and the (mean, var) of
the first 512 channels, zero-padded. The size never depends on the layer, so
ranks that disagree raise the same clear error instead of mixing statistics
or aborting gloo on a size mismatch; layers wider than 512 channels gather
the rest in a second collective once the headers agree. Backward reduces the
two per-channel gradient sums in one collective (an all-gather summed locally
on gloo, whose small all-reduce is several times slower; an all-reduce elsewhere).

A rank that stops calling BatchNorm leaves its peers waiting in a collective
until the process group's own timeout (``init_process_group(timeout=...)``).
"""
from __future__ import annotations

import itertools
import threading
import zlib
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .eps_mode import variance_for_normalization
from .errors import ReplicaMismatchError
from .functional import normalize_backward, normalize_with_stats
from .moments import (
    chan_merge,
    channel_view_shape,
    count_weights,
    local_mean_var,
    values_per_channel,
)

NAME_ATTRIBUTE = "_autosyncbn_name"
"""A layer's qualified name (set by ``convert_model``), used to tell layers apart across ranks."""

_lock = threading.Lock()
_first_use = itertools.count()
_call_counters: dict = {}
_names_by_fingerprint: dict[int, str] = {}


def _distributed() -> Any:
    import torch.distributed as dist

    return dist


def record_name(layer: _BatchNorm, name: str) -> None:
    """Name ``layer`` for cross-rank checks; every rank that records it can print it."""
    layer.__dict__[NAME_ATTRIBUTE] = name
    _fingerprint(name)


def layer_name(layer: _BatchNorm) -> str:
    """The layer's recorded name, else its order of first synchronized use in this process."""
    name = layer.__dict__.get(NAME_ATTRIBUTE)
    if name is None:
        with _lock:
            name = layer.__dict__.setdefault(NAME_ATTRIBUTE, f"<BatchNorm first used #{next(_first_use)}>")
    return name


def _fingerprint(name: str) -> int:
    value = zlib.crc32(name.encode())
    _names_by_fingerprint[value] = name
    return value


def _next_call(group: Any) -> int:
    key = id(group) if group is not None else None
    with _lock:
        call = _call_counters.get(key, 0)
        _call_counters[key] = call + 1
    return call


def process_group_handle(layer: _BatchNorm, process_group: Any = None) -> Optional["ProcessGroupHandle"]:
    """A handle when ``torch.distributed`` is initialized and the group has 2+ ranks, else None."""
    dist = _distributed()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if process_group is None:
        process_group = dist.group.WORLD
    if dist.get_world_size(process_group) < 2:
        return None
    return ProcessGroupHandle(process_group, layer_name(layer))


class ProcessGroupHandle:
    """What a layer needs to synchronize over one process group for one call."""

    # Every rank holds its own buffers and computes the same global statistics.
    updates_running_stats = True

    def __init__(self, process_group: Any, layer: str) -> None:
        self.process_group = process_group
        self.layer = layer

    def batch_norm(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor, int]:
        total: list[int] = []  # filled by forward: the global value count per channel
        output, mean, var = _DistributedBatchNorm.apply(
            input, weight, bias, eps, self.process_group, self.layer, total
        )
        return output, mean, var, total[0]


def _gather(tensor: Tensor, group: Any) -> Tensor:
    dist = _distributed()
    world = dist.get_world_size(group)
    out = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    # all_gather_single is the newer name (PyTorch 2.10+) of all_gather_into_tensor.
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_into(out, tensor, group=group)
    return out.view(world, -1)


HEADER = 4
"""call number, channel count, value count, layer fingerprint."""

FIRST_CHANNELS = 512
"""Channels whose moments ride in the fixed-size first all-gather."""


def _check_headers(headers: Tensor, group: Any, layer: str) -> list[int]:
    """Per-rank value counts, or the same error on every rank (all gathered the same headers)."""
    dist = _distributed()
    rows = [[int(value) for value in row] for row in headers.tolist()]
    me = dist.get_rank(group)
    if len({(row[0], row[1], row[3]) for row in rows}) > 1:
        detail = ", ".join(
            f"rank {rank}: call {call} of '{_names_by_fingerprint.get(print_, f'layer #{print_}')}' "
            f"with {channels} channels"
            for rank, (call, channels, _, print_) in enumerate(rows)
        )
        raise ReplicaMismatchError(
            f"on rank {me} (group rank): ranks disagree at synchronized BatchNorm call "
            f"{rows[me][0]} (this rank: '{layer}'): {detail}. Every rank must run the same "
            f"BatchNorm layers in the same order."
        )
    total = sum(row[2] for row in rows)
    if total <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {total} value(s) per "
            f"channel over all ranks (per rank: {[row[2] for row in rows]}) at layer '{layer}'"
        )
    return [row[2] for row in rows]


def _gather_moments(header: list[int], mean: Tensor, var: Tensor, group: Any,
                    layer: str) -> tuple[list[int], Tensor, Tensor]:
    """Every rank's (count, mean, var), checked: one collective for up to 512 channels."""
    channels = mean.numel()
    first = min(channels, FIRST_CHANNELS)
    record = torch.zeros(HEADER + 2 * FIRST_CHANNELS, dtype=torch.float64, device=mean.device)
    record[:HEADER] = torch.tensor(header, dtype=torch.float64)
    record[HEADER:HEADER + first] = mean[:first]
    record[HEADER + FIRST_CHANNELS:HEADER + FIRST_CHANNELS + first] = var[:first]
    gathered = _gather(record, group)
    counts = _check_headers(gathered[:, :HEADER], group, layer)
    means = gathered[:, HEADER:HEADER + first]
    variances = gathered[:, HEADER + FIRST_CHANNELS:HEADER + FIRST_CHANNELS + first]
    if channels > first:  # the headers agree, so every rank sends the same size
        rest = _gather(torch.cat([mean[first:], var[first:]]).to(torch.float64), group)
        means = torch.cat([means, rest[:, :channels - first]], dim=1)
        variances = torch.cat([variances, rest[:, channels - first:]], dim=1)
    return counts, means, variances


def _sum_over_ranks(tensor: Tensor, group: Any) -> Tensor:
    dist = _distributed()
    if dist.get_backend(group) == "gloo":
        return _gather(tensor, group).sum(0)
    dist.all_reduce(tensor, group=group)
    return tensor


class _DistributedBatchNorm(torch.autograd.Function):
    """BatchNorm whose statistics and gradient sums are reduced across a process group.

    Saves the input once plus per-channel vectors, as ``nn.BatchNorm`` does.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                group: Any, layer: str, total_out: list) -> tuple[Tensor, Tensor, Tensor]:
        channels = input.shape[1]
        count = values_per_channel(input)
        header = [_next_call(group), channels, count, _fingerprint(layer)]
        mean, var = local_mean_var(input)
        counts, means, variances = _gather_moments(header, mean, var, group, layer)
        total = sum(counts)
        merged_mean, merged_var, _ = chan_merge(count_weights(tuple(counts), input.device), means, variances)
        global_mean, global_var = merged_mean.to(mean.dtype), merged_var.to(mean.dtype)
        normalizing_var, normalizing_eps = variance_for_normalization(global_var, eps)
        ctx.eps, ctx.group, ctx.total = normalizing_eps, group, total
        # Under the 'clamp' eps mode, a clamped channel's scale no longer depends on var.
        ctx.var_is_live = normalizing_var == global_var if normalizing_eps == 0.0 else None
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(input, weight, global_mean, normalizing_var)
        ctx.mark_non_differentiable(global_mean, global_var)
        total_out.append(total)
        output = normalize_with_stats(input, weight, bias, global_mean, normalizing_var, normalizing_eps)
        return output, global_mean, global_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor, _mean: Any, _var: Any) -> tuple[Optional[Tensor], ...]:
        input, weight, mean, var = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_partial, sum_dy_xhat, sum_dy = normalize_backward(
            grad_output, input, weight, mean, var, ctx.eps, need_input
        )
        grad_input = None
        if need_input:
            sums = _sum_over_ranks(torch.cat([sum_dy, sum_dy_xhat]).to(mean.dtype), ctx.group)
            channels = mean.numel()
            mean_dy, mean_dy_xhat = sums[:channels] / ctx.total, sums[channels:] / ctx.total
            invstd = torch.rsqrt(var + ctx.eps)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)) = partial + a + b * x
            slope = -scale * invstd * mean_dy_xhat
            if ctx.var_is_live is not None:
                slope = slope * ctx.var_is_live
            offset = -scale * mean_dy - slope * mean
            shape = channel_view_shape(input)
            grad_input = torch.addcmul(grad_partial, input, slope.view(shape))
            grad_input.add_(offset.view(shape))
            grad_input = grad_input.to(input.dtype)
        # Parameter gradients stay local, as in nn.SyncBatchNorm: DDP reduces them.
        grad_weight = sum_dy_xhat.to(ctx.weight_dtype) if need_weight and weight is not None else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias and ctx.bias_dtype is not None else None
        return grad_input, grad_weight, grad_bias, None, None, None, None


