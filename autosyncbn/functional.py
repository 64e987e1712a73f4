"""Synchronized batch normalization: the autograd Functions and ``F.batch_norm``'s semantics.

All BatchNorm math of autosyncbn lives here and in ``moments.py``; the two
backends only move values (``group.py`` between replica threads,
``distributed.py`` between processes). One synchronized call is::

    each part:  x --_LocalMoments--> (x view, moments_i = [mean_i; var_i])
    merge:      (n_i, moments_i of every part) --Chan--> moments = [mean; var]
    each part:  (x view, mean, var, weight, bias) --_NormalizeWithStats--> y

The merge is one of two autograd Functions, which share the forward
(``moments.chan_merge``) and the chain rule (``moments.merge_gradients``):

- ``_MergeReplicas``: every part lives in this process (DataParallel replica
  threads). One node takes all replicas' moments and returns the merged
  statistics to each, so backward sums their gradients with no barrier (a
  barrier in backward would deadlock on CPU, where autograd runs every
  replica's backward in one thread).
- ``_MergeOverTransport``: the other parts live in other processes. Forward
  gathers the moments through a transport; backward sums the 2C gradients of
  the merged mean and variance through it (one collective; two past 512
  channels), then applies the same chain rule.

The input is saved once, by ``_LocalMoments``; ``_NormalizeWithStats``
borrows it, so a layer saves what ``nn.BatchNorm`` saves: the input plus
per-channel vectors. With ``create_graph=True`` the backward passes use
differentiable ops, so double backward (gradient penalties) works.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .eps_mode import get_sbn_eps_mode
from .moments import (
    chan_merge,
    channel_view_shape,
    count_weights,
    local_moments,
    merge_gradients,
    reduction_dims,
    update_running_stats,
    values_per_channel,
)

Exchange = Callable[[int, Tensor], "tuple[Tensor, int]"]
"""``(count, moments_i)`` of this part -> the merged (2, C) ``(mean, biased var)`` and the
total count, autograd-connected to every part's moments."""

_HALF_TYPES = (torch.float16, torch.bfloat16)


class MomentsTransport(Protocol):
    """How per-part moments and their gradients travel between processes (one per call)."""

    total: int
    """The whole batch's value count per channel, known once :meth:`gather` ran."""

    def gather(self, count: int, moments: Tensor) -> "tuple[list[int], Tensor, int]":
        """Every part's count and (2, C) moments (stacked: parts, 2, C), and this part's index."""

    def sum_gradients(self, grad: Tensor) -> Tensor:
        """The (2, C) gradient of the merged (mean, var), summed over every part."""


# -- argument checks: PyTorch's errors, raised before any peer is involved -----
def check_arguments(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: Any, eps: float) -> None:
    """Raise what ``F.batch_norm`` raises in training for these arguments, with its types."""
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for \'{str(input.dtype)[6:].capitalize()}\'')
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError(f"batch_norm(): argument 'momentum' must be float, not {type(momentum).__name__}")
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    channels = input.shape[1]
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var),
                         ("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {tensor.numel()}")
        if tensor.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found {name} on "
                f"{tensor.device} and input on {input.device}"
            )
        if tensor.dtype != input.dtype and not (input.dtype in _HALF_TYPES and tensor.dtype == torch.float32):
            raise RuntimeError(
                f"mixed dtype: {name} is {tensor.dtype} but the input is {input.dtype}; "
                f"PyTorch's BatchNorm needs them to match (float32 statistics are allowed "
                f"only with a float16/bfloat16 input)"
            )


# -- local moments ---------------------------------------------------------------
class _LocalMoments(torch.autograd.Function):
    """x -> (x, [mean_i; var_i]) of this slice; backward adds the statistics' share of dx."""

    @staticmethod
    def forward(ctx: Any, input: Tensor) -> tuple[Tensor, Tensor]:
        moments = local_moments(input)
        ctx.count = values_per_channel(input)
        ctx.save_for_backward(input, moments)
        return input.view_as(input), moments

    @staticmethod
    def backward(ctx: Any, grad_input: Optional[Tensor], grad_moments: Optional[Tensor]) -> Tensor:
        input, moments = ctx.saved_tensors
        if grad_moments is None:
            grad_moments = torch.zeros_like(moments)
        if grad_input is None:
            grad_input = torch.zeros_like(input)
        # d mean_i/dx = 1/n and d var_i/dx = 2 (x - mean_i)/n:
        # dx += slope * (x - mean_i) + offset. Centred first: with a large mean,
        # slope * x - slope * mean_i would cancel away the digits that matter.
        count = max(ctx.count, 1)
        mean = moments[0]
        slope = grad_moments[1] * (2.0 / count)
        offset = grad_moments[0] / count
        shape = channel_view_shape(input)
        if torch.is_grad_enabled():  # create_graph: keep it differentiable
            centred = input.to(mean.dtype) - mean.view(shape)
            return (grad_input + centred * slope.view(shape) + offset.view(shape)).to(input.dtype)
        if input.dtype != mean.dtype:  # half input: accumulate in float32
            statistics_share = torch.addcmul(offset.view(shape), input.to(mean.dtype) - mean.view(shape),
                                             slope.view(shape))
        else:
            statistics_share = centred_affine(input, mean, slope, offset)
        # The incoming gradient is _NormalizeWithStats' fresh tensor, consumed only here.
        return grad_input.to(mean.dtype).add_(statistics_share).to(input.dtype)


def centred_affine(input: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(input - centre) * scale + shift`` per channel, in one fused pass.

    PyTorch's eval-mode BatchNorm kernel computes exactly this with a unit
    variance and no eps, subtracting the centre before it scales.
    """
    return torch.native_batch_norm(input, scale, shift, centre, torch.ones_like(centre), False, 0.0, 0.0)[0]


# -- merges ----------------------------------------------------------------------
def _on(device: torch.device, tensor: Tensor) -> Tensor:
    return tensor if tensor.device == device else tensor.to(device)


class _MergeReplicas(torch.autograd.Function):
    """Every replica's moments -> the merged moments on every replica's device (one node)."""

    @staticmethod
    def forward(ctx: Any, counts: tuple[int, ...], *moments: Tensor) -> tuple[Tensor, ...]:
        device, dtype = moments[0].device, moments[0].dtype
        # float64 on per-channel vectors: the merge adds no error of its own.
        stacked = torch.stack([_on(device, m) for m in moments]).double()
        weights = count_weights(counts, device)
        merged, ctx.deviation = chan_merge(weights, stacked)
        merged = merged.to(dtype)
        ctx.counts = counts
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*moments)
        # A distinct tensor per replica: each receives its own gradient, and backward
        # sums them in replica order, so results do not depend on thread timing.
        return tuple(merged if i == 0 else merged.to(m.device, copy=True) for i, m in enumerate(moments))

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        moments = ctx.saved_tensors
        device, dtype = moments[0].device, moments[0].dtype
        weights = count_weights(ctx.counts, device)
        deviation = ctx.deviation
        if torch.is_grad_enabled():  # double backward: recompute it differentiably
            _, deviation = chan_merge(weights, torch.stack([_on(device, m) for m in moments]).double())
        present = [_on(device, g) for g in grads if g is not None]
        if not present:
            return (None,) * (len(moments) + 1)
        summed = (present[0] if len(present) == 1 else torch.stack(present).sum(0)).double()
        shares = merge_gradients(weights, deviation, summed).to(dtype)
        return (None, *[_on(m.device, share) for share, m in zip(shares, moments)])


def merge_replica_moments(counts: Sequence[int], moments: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The merged moments for each replica, on its device, autograd-connected to all."""
    return _MergeReplicas.apply(tuple(counts), *moments)


class _MergeOverTransport(torch.autograd.Function):
    """This process's moments -> the merged moments, the other parts gathered by a transport."""

    @staticmethod
    def forward(ctx: Any, moments: Tensor, count: int, transport: MomentsTransport) -> Tensor:
        counts, gathered, row = transport.gather(count, moments)
        weights = count_weights(tuple(counts), moments.device)
        merged, deviation = chan_merge(weights, gathered.double())
        ctx.transport = transport
        ctx.save_for_backward(weights[row:row + 1], deviation[row:row + 1])
        return merged.to(moments.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        weight, deviation = ctx.saved_tensors
        summed = ctx.transport.sum_gradients(grad.double())
        return merge_gradients(weight, deviation, summed)[0].to(grad.dtype), None, None


def merge_over(transport: MomentsTransport) -> Exchange:
    """An exchange that merges this process's moments with those a transport gathers."""

    def exchange(count: int, moments: Tensor) -> tuple[Tensor, int]:
        return _MergeOverTransport.apply(moments, count, transport), transport.total

    return exchange


# -- normalization ---------------------------------------------------------------
def _kernel_affine(param: Optional[Tensor], stats_dtype: torch.dtype) -> Optional[Tensor]:
    """PyTorch's mixed-precision BatchNorm kernels want float32 affine params with float32 stats."""
    if param is None or param.dtype == stats_dtype:
        return param
    return param.to(stats_dtype)


def normalize_with_stats(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """PyTorch's fused eval-mode BatchNorm kernel: normalize with the given statistics."""
    return torch.native_batch_norm(
        input, _kernel_affine(weight, mean.dtype), _kernel_affine(bias, mean.dtype),
        mean, var, False, 0.0, eps,
    )[0]


def normalize_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                       var: Tensor, eps: float, need_input: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """One fused pass: (dy * weight * invstd, sum(dy * xhat), sum(dy)) per channel."""
    if input.numel() == 0:
        # PyTorch's kernel divides by the element count; an empty slice adds nothing.
        zeros = torch.zeros_like(mean)
        return (torch.zeros_like(input) if need_input else None), zeros, zeros.clone()
    # Empty save_mean/save_invstd mean "eval mode: use the running statistics" to
    # CUDA's kernel (as cuDNN's eval backward passes them); None trips its assert.
    unused = mean.new_empty(0)
    return torch.ops.aten.native_batch_norm_backward(
        grad_output, input, _kernel_affine(weight, mean.dtype), mean, var,
        unused, unused, False, eps, [need_input, True, True],
    )


class _NormalizeWithStats(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the given (2, C) [mean; var].

    Backward returns dy's direct share of dx plus the (2, C) gradient of the
    statistics, which autograd carries back through the merge to every part.
    Under the classic 'clamp' eps mode the variance is clamped at eps instead,
    and a clamped channel's variance gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, stats: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float, moments_node: Any) -> Tensor:
        clamp = get_sbn_eps_mode() == "clamp"
        variance = stats[1].clamp(min=eps) if clamp else stats[1]
        ctx.eps, ctx.clamp, ctx.moments_node = eps, clamp, moments_node
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # Save the input only when _LocalMoments did not (x needs no grad).
        saved_input = input if moments_node is None else None
        ctx.save_for_backward(saved_input, stats, weight)
        return normalize_with_stats(input, weight, bias, stats[0], variance, 0.0 if clamp else eps)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        saved_input, stats, weight = ctx.saved_tensors
        input = saved_input if ctx.moments_node is None else ctx.moments_node.saved_tensors[0]
        need_input, need_stats, need_weight, need_bias = ctx.needs_input_grad[:4]
        mean, var = stats[0], stats[1]
        variance = var.clamp(min=ctx.eps) if ctx.clamp else var
        eps = 0.0 if ctx.clamp else ctx.eps
        invstd = (variance + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        if torch.is_grad_enabled():
            # create_graph=True (double backward): composite, differentiable ops.
            shape = channel_view_shape(input)
            dims = reduction_dims(input)
            dy = grad_output.to(mean.dtype)
            xhat = (input.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
            grad_input = (dy * scale.view(shape)).to(input.dtype) if need_input else None
            sum_dy = dy.sum(dims)
            sum_dy_xhat = (dy * xhat).sum(dims)
        else:
            grad_input, sum_dy_xhat, sum_dy = normalize_backward(
                grad_output, input, weight, mean, variance, eps, need_input
            )
        grad_stats = None
        if need_stats:
            grad_var = scale * invstd * sum_dy_xhat * -0.5
            if ctx.clamp:
                grad_var = grad_var * (var >= ctx.eps)
            grad_stats = torch.stack([(scale * sum_dy).neg(), grad_var])
        grad_weight = sum_dy_xhat.to(ctx.weight_dtype) if need_weight and ctx.weight_dtype else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias and ctx.bias_dtype else None
        return grad_input, grad_stats, grad_weight, grad_bias, None, None


# -- the call --------------------------------------------------------------------
def sync_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    exchange: Exchange) -> tuple[Tensor, Tensor, int]:
    """Batch-normalize ``input`` with statistics merged across parts by ``exchange``.

    Returns the output, the merged (2, C) (mean, biased variance) and the
    value count per channel. Every part sees the same total, so a whole batch
    of one value per channel raises PyTorch's ``ValueError`` in every part
    alike; an empty whole batch gives empty outputs, as PyTorch does.
    """
    input_view, moments = _LocalMoments.apply(input)
    merged, total = exchange(values_per_channel(input), moments)
    if total == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {total} value(s) per "
            f"channel over the whole batch (input size of this part {list(input.shape)})"
        )
    output = _NormalizeWithStats.apply(input_view, merged, weight, bias, eps, moments.grad_fn)
    return output, merged, total


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
               exchange: Exchange, updates_running_stats: bool) -> Tensor:
    """``F.batch_norm(..., training=True)`` with whole-batch statistics from ``exchange``.

    The running statistics are the tensors passed, updated from the merged
    statistics with the momentum passed (the unbiased variance), exactly as
    the call would have on one device, by the part that owns them.
    """
    check_arguments(input, running_mean, running_var, weight, bias, momentum, eps)
    output, merged, total = sync_batch_norm(input, weight, bias, eps, exchange)
    if updates_running_stats and total > 0:  # an empty whole batch leaves them, as PyTorch does
        update_running_stats(running_mean, running_var, merged, total, float(momentum))
    return output
