"""Autograd Functions for synchronized BatchNorm across replica threads.

One synchronized layer call in one replica is two Functions joined by the
exchange (see ``group.py``)::

    x --_LocalMoments--> (x view, mean_i, M2_i) --exchange/merge--> (mean, var)
    (x view, mean, var, weight, bias) --_NormalizeWithStats--> y

The global ``mean``/``var`` are autograd-connected to every replica's
``mean_i``/``M2_i``, so backward reaches every slice with no barrier (a
barrier in backward would deadlock on CPU, where autograd runs every replica's
backward in one thread). The input is saved once, by ``_LocalMoments``;
``_NormalizeWithStats`` borrows it, so a layer saves what ``nn.BatchNorm``
saves: the input plus per-channel vectors.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .moments import (
    accumulation_dtype,
    channel_view_shape,
    local_mean_var,
    reduction_dims,
    values_per_channel,
)

# (count, mean_i, M2_i) of this replica -> (global mean, global biased var, global count)
Exchange = Callable[[int, Tensor, Tensor], "tuple[Tensor, Tensor, int]"]


class _LocalMoments(torch.autograd.Function):
    """x -> (x, mean, M2) of this slice; backward adds the statistics' share of dx."""

    @staticmethod
    def forward(ctx: Any, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, var = local_mean_var(input)
        count = values_per_channel(input)
        ctx.count = count
        ctx.save_for_backward(input, mean)
        return input.view_as(input), mean, var * count

    @staticmethod
    def backward(ctx: Any, grad_input: Optional[Tensor], grad_mean: Optional[Tensor],
                 grad_m2: Optional[Tensor]) -> Tensor:
        input, mean = ctx.saved_tensors
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_m2 is None:
            grad_m2 = torch.zeros_like(mean)
        shape = channel_view_shape(input)
        # d mean/dx = 1/n and d M2/dx = 2 (x - mean): dx += a + b * x per channel.
        slope = (2.0 * grad_m2).view(shape)
        offset = (grad_mean / ctx.count).view(shape) - slope * mean.view(shape)
        if grad_input is None:
            grad_input = torch.zeros_like(input)
        grad = torch.addcmul(grad_input, input, slope)
        if torch.is_grad_enabled():
            grad = grad + offset
        else:
            grad.add_(offset)
        return grad.to(input.dtype)


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
    return torch.ops.aten.native_batch_norm_backward(
        grad_output, input, _kernel_affine(weight, mean.dtype), mean, var,
        None, None, False, eps, [need_input, True, True],
    )


class _NormalizeWithStats(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with given statistics.

    Runs PyTorch's fused eval-mode BatchNorm kernels in both directions.
    Backward returns dy's direct share of dx plus the gradients of mean and var,
    which autograd carries back through the merge to every replica.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, moments_node: Any) -> Tensor:
        ctx.eps = eps
        ctx.moments_node = moments_node
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # Save the input only when _LocalMoments did not (x needs no grad).
        saved_input = input if moments_node is None else None
        ctx.save_for_backward(saved_input, mean, var, weight)
        return normalize_with_stats(input, weight, bias, mean, var, eps)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        saved_input, mean, var, weight = ctx.saved_tensors
        input = saved_input if ctx.moments_node is None else ctx.moments_node.saved_tensors[0]
        need_input, need_mean, need_var, need_weight, need_bias = ctx.needs_input_grad[:5]
        invstd = torch.rsqrt(var + ctx.eps)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        if torch.is_grad_enabled():
            # create_graph=True (double backward): composite, differentiable ops.
            shape = channel_view_shape(input)
            dims = reduction_dims(input)
            acc = accumulation_dtype(input.dtype)
            dy = grad_output.to(acc)
            xhat = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
            grad_input = (dy * scale.view(shape)).to(input.dtype) if need_input else None
            sum_dy = dy.sum(dims)
            sum_dy_xhat = (dy * xhat).sum(dims)
        else:
            grad_input, sum_dy_xhat, sum_dy = normalize_backward(
                grad_output, input, weight, mean, var, ctx.eps, need_input
            )
        grad_mean = -scale * sum_dy if need_mean else None
        grad_var = -0.5 * scale * invstd * sum_dy_xhat if need_var else None
        grad_weight = sum_dy_xhat.to(ctx.weight_dtype) if need_weight and ctx.has_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias and ctx.has_bias else None
        return grad_input, grad_mean, grad_var, grad_weight, grad_bias, None, None


def sync_batch_norm(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    exchange: Exchange,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Batch-normalize ``input`` with statistics merged across peers by ``exchange``.

    Returns the output and the global mean, biased variance and value count
    per channel (the caller updates running statistics from them).
    """
    input_view, mean, m2 = _LocalMoments.apply(input)
    global_mean, global_var, total = exchange(values_per_channel(input), mean, m2)
    output = _NormalizeWithStats.apply(
        input_view, global_mean, global_var, weight, bias, eps, mean.grad_fn
    )
    return output, global_mean, global_var, total
