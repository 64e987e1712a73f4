"""Autograd Functions for synchronized BatchNorm across replica threads.

One synchronized layer call is three Functions, joined by the exchange in
``group.py``::

    replica i:  x --_LocalMoments--> (x view, mean_i, var_i)
    once:       (n_i, mean_i, var_i for every i) --_MergeMoments--> (mean, var) on each replica's device
    replica i:  (x view, mean, var, weight, bias) --_NormalizeWithStats--> y

The global ``mean``/``var`` are autograd-connected to every replica's
``mean_i``/``var_i``, so backward reaches every slice with no barrier (a
barrier in backward would deadlock on CPU, where autograd runs every replica's
backward in one thread). The input is saved once, by ``_LocalMoments``;
``_NormalizeWithStats`` borrows it, so a layer saves what ``nn.BatchNorm``
saves: the input plus per-channel vectors. Each Function is one autograd node
running PyTorch's fused BatchNorm kernels where they exist; with
``create_graph=True`` the backward passes use differentiable ops instead, so
double backward (gradient penalties) works.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .eps_mode import variance_for_normalization
from .moments import (
    chan_merge,
    channel_view_shape,
    count_weights,
    local_mean_var,
    reduction_dims,
    values_per_channel,
)

# (count, mean_i, var_i) of this replica -> (global mean, global biased var, global count)
Exchange = Callable[[int, Tensor, Tensor], "tuple[Tensor, Tensor, int]"]


class _LocalMoments(torch.autograd.Function):
    """x -> (x, mean_i, var_i) of this slice; backward adds the statistics' share of dx."""

    @staticmethod
    def forward(ctx: Any, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, var = local_mean_var(input)
        ctx.count = values_per_channel(input)
        ctx.save_for_backward(input, mean)
        return input.view_as(input), mean, var

    @staticmethod
    def backward(ctx: Any, grad_input: Optional[Tensor], grad_mean: Optional[Tensor],
                 grad_var: Optional[Tensor]) -> Tensor:
        input, mean = ctx.saved_tensors
        count = max(ctx.count, 1)
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_var is None:
            grad_var = torch.zeros_like(mean)
        if grad_input is None:
            grad_input = torch.zeros_like(input)
        shape = channel_view_shape(input)
        # d mean_i/dx = 1/n and d var_i/dx = 2 (x - mean_i)/n: dx += offset + slope * x.
        slope = grad_var * (2.0 / count)
        offset = torch.addcmul(grad_mean / count, slope, mean, value=-1.0)
        if torch.is_grad_enabled():  # create_graph: keep it differentiable
            return (torch.addcmul(grad_input, input, slope.view(shape)) + offset.view(shape)).to(input.dtype)
        if grad_input.dtype != slope.dtype:  # half input: accumulate in float32
            grad_input = grad_input.to(slope.dtype)
        # The incoming gradient is _NormalizeWithStats' fresh tensor, consumed only here.
        return grad_input.addcmul_(input, slope.view(shape)).add_(offset.view(shape)).to(input.dtype)


class _MergeMoments(torch.autograd.Function):
    """Every replica's (mean_i, var_i) -> (mean, biased var) on every replica's device.

    Chan's parallel merge with weights w_i = n_i / N, done once per call as one
    autograd node: ``mean = sum w_i mean_i``, ``var = sum w_i var_i + sum w_i
    (mean_i - mean)^2``. Backward sums the gradients that all replicas' outputs received and hands
    each replica its share: ``d mean/d mean_i = w_i``, ``d var/d mean_i =
    2 w_i (mean_i - mean)``, ``d var/d var_i = w_i``.
    """

    @staticmethod
    def forward(ctx: Any, counts: tuple[int, ...], *moments: Tensor) -> tuple[Tensor, ...]:
        device, dtype = moments[0].device, moments[0].dtype
        mean, var, _ = _stacked_merge(counts, moments, device)
        mean, var = mean.to(dtype), var.to(dtype)
        ctx.counts = counts
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*moments)
        # A distinct tensor per replica: each receives its own gradient, and backward
        # sums them in replica order, so results do not depend on thread timing.
        return tuple(
            t.to(m.device, copy=index > 0)
            for index, m in enumerate(moments[:len(counts)])
            for t in (mean, var)
        )

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        moments = ctx.saved_tensors
        replicas = len(ctx.counts)
        device, dtype = moments[0].device, moments[0].dtype
        # Recomputed from the saved inputs, so double backward differentiates it too.
        _, _, deviation = _stacked_merge(ctx.counts, moments, device)
        grad_mean = _sum_on(device, grads[0::2], moments[0])
        grad_var = _sum_on(device, grads[1::2], moments[0])
        column = count_weights(ctx.counts, device).unsqueeze(1)
        grad_means = (torch.addcmul(grad_mean, deviation, grad_var, value=2.0) * column).to(dtype)
        grad_variances = (grad_var * column).to(dtype)
        return (
            None,
            *[grad_means[i].to(m.device) for i, m in enumerate(moments[:replicas])],
            *[grad_variances[i].to(m.device) for i, m in enumerate(moments[:replicas])],
        )


def _stacked_merge(counts: tuple[int, ...], moments: Sequence[Tensor],
                   device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of (means..., variances...) gathered on ``device``, in float64.

    Per-channel vectors only, so float64 costs nothing and the merge adds no
    error of its own.
    """
    stacked = torch.stack([m.to(device) for m in moments]).double()
    replicas = len(counts)
    return chan_merge(count_weights(counts, device), stacked[:replicas], stacked[replicas:])


def _sum_on(device: torch.device, grads: Sequence[Optional[Tensor]], like: Tensor) -> Tensor:
    present = [g.to(device) for g in grads if g is not None]
    if not present:
        return torch.zeros_like(like)
    if len(present) == 1:
        return present[0]
    return torch.stack(present).sum(0)


def merge_replica_moments(counts: Sequence[int], means: Sequence[Tensor],
                          variances: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Global (mean, biased var) for each replica, on its device, autograd-connected to all."""
    outputs = _MergeMoments.apply(tuple(counts), *means, *variances)
    return [(outputs[2 * i], outputs[2 * i + 1]) for i in range(len(counts))]


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

    Backward returns dy's direct share of dx plus the gradients of mean and var,
    which autograd carries back through the merge to every replica.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, moments_node: Any) -> Tensor:
        ctx.eps = eps
        ctx.moments_node = moments_node
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
        invstd = (var + ctx.eps).rsqrt()
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
                grad_output, input, weight, mean, var, ctx.eps, need_input
            )
        grad_mean = (scale * sum_dy).neg() if need_mean else None
        grad_var = torch.mul(scale * invstd, sum_dy_xhat).mul(-0.5) if need_var else None
        grad_weight = sum_dy_xhat.to(ctx.weight_dtype) if need_weight and ctx.weight_dtype else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias and ctx.bias_dtype else None
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
    input_view, mean, var = _LocalMoments.apply(input)
    global_mean, global_var, total = exchange(values_per_channel(input), mean, var)
    normalizing_var, normalizing_eps = variance_for_normalization(global_var, eps)
    output = _NormalizeWithStats.apply(
        input_view, global_mean, normalizing_var, weight, bias, normalizing_eps, mean.grad_fn
    )
    return output, global_mean, global_var, total
