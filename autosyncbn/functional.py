"""Synchronized batch normalization: the autograd Functions and ``F.batch_norm``'s semantics.

All BatchNorm math of autosyncbn lives here and in ``moments.py``; the two
backends only move values (``group.py`` between replica threads,
``distributed.py`` between processes). One synchronized layer call, in each
part of the batch (a replica thread or a process)::

    local_moments(x_i)                  this slice's (mean_i, var_i): one pass, no autograd
    exchange                            the whole batch's (mean, var): Chan's merge of every
                                        part's moments, in one LayerCall per layer call
    _MergeStatistics(x_1 .. x_P, w_i)   one autograd node for the parts in this process:
        -> view_i, stats_i              each part's input (a view) and copy of (mean, var)
    _Normalize(view_i, stats_i, w, b)   PyTorch's eval kernel with those statistics
        -> y_i

Backward runs the same way back. Each ``_Normalize`` sums dy and dy * xhat
over its slice (one pass) and returns the gradient of its statistics and of
weight and bias; ``_MergeStatistics`` adds those gradients over every part
(threads: here, in a fixed order; processes: one collective of 2C values) and
forms every part's dx in one more pass:

    dx = scale * dy + g_mean / N + 2 g_var (x - mean) / N,   scale = weight / std

dy reaches the merge node as the gradient of the input view it gave
``_Normalize``, so dx is formed in one place, in two passes as
``nn.BatchNorm``'s backward does, and nothing is handed over outside
autograd (concurrent backward passes over one graph stay apart). The
backward nodes of a layer call are one per part plus one merge node: on CPU,
autograd runs all replicas' backward in one thread, so nothing in backward
waits for a peer.

A layer call saves each part's input once (the merge node saves them) plus
per-channel vectors, what ``nn.BatchNorm`` saves. With ``create_graph=True``
backward uses differentiable ops (and recomputes the mean from the inputs),
so double backward (gradient penalties) works in replica threads.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .eps_mode import get_sbn_eps_mode
from .moments import (
    as_dtype,
    chan_merge,
    channel_view_shape,
    local_moments,
    reduction_dims,
    update_running_stats,
    values_per_channel,
)

_HALF_TYPES = (torch.float16, torch.bfloat16)


class MomentsTransport(Protocol):
    """How per-part moments and their gradients travel between processes (one per call)."""

    def gather(self, count: int, mean: Tensor, var: Tensor) -> "tuple[list[int], Tensor]":
        """Every part's value count and (mean, var), stacked as (parts, 2, C)."""

    def sum_gradients(self, grad: Tensor) -> Tensor:
        """The (2, C) gradient of the merged (mean, var), summed over every part."""


class Share(NamedTuple):
    """What an exchange hands one part: its input as the merge node sees it, its statistics, the call."""

    input: Tensor
    stats: Tensor
    call: "LayerCall"
    part: int


Exchange = Callable[[Tensor, Optional[Tensor], int, "tuple[Tensor, Tensor]", float], Share]
"""``(input, weight, count, moments, eps)`` of this part -> its :class:`Share` of the merged statistics."""


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


# -- one layer call ---------------------------------------------------------------
def _on(device: torch.device, tensor: Tensor) -> Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def _scale(invstd: Tensor, weight: Optional[Tensor]) -> Tensor:
    """``weight / std`` per channel: how much of dy reaches dx directly."""
    return invstd if weight is None else invstd * as_dtype(weight, invstd.dtype)


class LayerCall:
    """One synchronized layer call in this process: the merged statistics and vectors derived from them.

    Plain values only (no autograd node, no output of one), so a graph never
    keeps itself alive through it.
    """

    def __init__(self, merged: Tensor, total: int, eps: float, transport: Optional[MomentsTransport] = None) -> None:
        self.merged = merged  # (2, C): mean, biased variance; in the accumulation dtype
        self.mean, self.var = merged.unbind()
        self.total = total
        self.clamp = get_sbn_eps_mode() == "clamp"
        self.eps = eps
        self.kernel_eps = 0.0 if self.clamp else eps  # 'clamp': var is clamped at eps, none added
        self.transport = transport
        self._statistics: dict = {}
        self._coefficients: dict = {}

    def statistics(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(mean, variance for the kernel) on ``device``: the variance is clamped at eps under 'clamp'."""
        found = self._statistics.get(device)
        if found is None:
            var = _on(device, self.var)
            found = (_on(device, self.mean), var.clamp(min=self.eps) if self.clamp else var)
            self._statistics[device] = found
        return found

    def coefficients(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Backward's per-channel vectors on ``device``: invstd, the (2, C) d(mean, var)/d(sum dy, sum dy*xhat)
        for a unit weight, and ones (a unit weight or variance for PyTorch's kernels)."""
        found = self._coefficients.get(device)
        if found is None:
            invstd = (self.statistics(device)[1] + self.kernel_eps).rsqrt()
            # g_mean = -scale * sum(dy) and g_var = -scale * invstd / 2 * sum(dy * xhat),
            # scale = weight * invstd; a variance clamped at eps gets no gradient.
            var_coefficient = invstd * invstd * -0.5
            if self.clamp:
                var_coefficient = var_coefficient * (_on(device, self.var) >= self.eps)
            found = (invstd, torch.stack([invstd.neg(), var_coefficient]), torch.ones_like(invstd))
            self._coefficients[device] = found
        return found


def merge_parts(counts: Sequence[int], moments: Sequence[tuple[Tensor, Tensor]], inputs: Sequence[Tensor],
                weights: Sequence[Optional[Tensor]], eps: float) -> tuple[Share, ...]:
    """Every part lives in this process (DataParallel replica threads): merge their moments here."""
    device = moments[0][0].device
    parts = len(moments)
    stacked = torch.stack([_on(device, v) for pair in moments for v in pair]).view(parts, 2, -1)
    call = LayerCall(chan_merge(tuple(counts), stacked, stacked.dtype), sum(counts), eps)
    outputs = _MergeStatistics.apply(call, *inputs, *weights)
    return tuple(Share(outputs[part], outputs[parts + part], call, part) for part in range(parts))


def merge_over(transport: MomentsTransport) -> Exchange:
    """An exchange for a process whose peers are other processes, reached through ``transport``."""

    def exchange(input: Tensor, weight: Optional[Tensor], count: int, moments: tuple[Tensor, Tensor],
                 eps: float) -> Share:
        with torch.no_grad():  # moving values: no autograd (the gradient comes back in backward)
            counts, gathered = transport.gather(count, *moments)
            merged = chan_merge(tuple(counts), gathered, moments[0].dtype)
        call = LayerCall(merged, sum(counts), eps, transport)
        view, stats = _MergeStatistics.apply(call, input, weight)
        return Share(view, stats, call, 0)

    return exchange


class _MergeStatistics(torch.autograd.Function):
    """Every part's input (and weight) -> each part's input again, as a view, and its copy of (mean, var).

    The statistics are merged before (``LayerCall.merged``); this node is where
    their gradient comes back. Backward adds the parts' gradients of (mean,
    var) and forms each part's dx: ``g_mean / N + 2 g_var (x - mean) / N``
    plus dy's direct share. The input view carries that share from
    ``_Normalize``: ``scale * dy`` itself under ``create_graph=True``; else dy,
    which this node multiplies by ``scale = weight / std`` while it forms dx
    (one pass fewer). The view is private to ``_Normalize``, so no one else
    sees that gradient. Saves every part's input (the one activation-sized
    tensor a layer saves, as ``nn.BatchNorm`` does); ``_Normalize`` reads it
    here. In replica threads they are saved by the thread that merges (the
    last to arrive), under its saved-tensor hooks: replicas run the same code,
    so those are the hooks every replica set (``save_on_cpu`` works).
    """

    @staticmethod
    def forward(ctx: Any, call: LayerCall, *inputs_and_weights: Optional[Tensor]) -> tuple[Tensor, ...]:
        ctx.call = call
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs_and_weights)
        inputs = inputs_and_weights[:len(inputs_and_weights) // 2]
        merged = call.merged
        # A distinct statistics tensor per part: each receives its own gradient.
        views = (x.view_as(x) for x in inputs)  # type: ignore[union-attr]
        stats = (merged.clone() if x.device == merged.device else merged.to(x.device)  # type: ignore[union-attr]
                 for x in inputs)
        return (*views, *stats)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        raw_dy = not torch.is_grad_enabled()  # _Normalize ran in this same mode
        if ctx.call.transport is not None:
            return _input_gradients_over_transport(ctx, raw_dy, *grads)
        return _input_gradients(ctx, raw_dy, grads)


def _statistics_gradient(call: LayerCall, grads: Sequence[Optional[Tensor]]) -> Tensor:
    """The (2, C) gradient of the merged (mean, var) in this process, from the statistics half of ``grads``.

    Each entry is one part's true gradient with respect to its copy of (mean,
    var) (differentiable under ``create_graph=True``, so the sum is too); None
    where a part's output was not used. Replica threads: every part's, added
    here in one stack and one sum, a fixed order, so results never depend on
    thread timing. Processes: this process's one part (the collective adds the rest).
    """
    device = call.merged.device
    present = [_on(device, grad) for grad in grads if grad is not None]
    if not present:  # defensive: autograd skips this node when no part's output was used
        return torch.zeros_like(call.merged)
    return present[0] if len(present) == 1 else torch.stack(present).sum(0)


def _input_gradients(ctx: Any, raw_dy: bool, grads: Sequence[Optional[Tensor]],
                     summed: Optional[Tensor] = None) -> tuple[Optional[Tensor], ...]:
    """Each part's dx (``summed``: the (mean, var) gradients already added over every part)."""
    call: LayerCall = ctx.call
    parts = len(grads) // 2
    saved = ctx.saved_tensors
    inputs, weights = saved[:parts], saved[parts:]
    needs_input = ctx.needs_input_grad[1:parts + 1]
    if not any(needs_input):
        return (None,) * (len(saved) + 1)
    device = call.merged.device
    if summed is None:
        summed = _statistics_gradient(call, grads[parts:])
    total = max(call.total, 1)
    slope = summed[1] * (2.0 / total)
    offset = summed[0] / total
    grad_inputs: list = []
    if raw_dy:
        for part, input in enumerate(inputs):
            grad_inputs.append(_input_gradient(call, grads[part], input, weights[part], slope, offset)
                               if needs_input[part] else None)
    else:
        # create_graph=True: composite ops, with the mean as a function of every
        # part's input, so second derivatives see it move (over a transport the
        # other parts' inputs are elsewhere: once differentiable, the merged mean).
        if call.transport is None:
            mean = sum(_on(device, x.to(summed.dtype).sum(reduction_dims(x))) for x in inputs) / total
        else:
            mean = call.mean
        for part, input in enumerate(inputs):
            if not needs_input[part]:
                grad_inputs.append(None)
                continue
            shape = channel_view_shape(input)
            on = input.device
            share = ((input.to(summed.dtype) - _on(on, mean).view(shape)) * _on(on, slope).view(shape)
                     + _on(on, offset).view(shape)).to(input.dtype)
            grad_inputs.append(share if grads[part] is None else grads[part] + share)
    return (None, *grad_inputs, *(None,) * parts)


@torch.autograd.function.once_differentiable
def _input_gradients_over_transport(ctx: Any, raw_dy: bool, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """One part in this process: the (mean, var) gradients of all parts are added by one collective."""
    call: LayerCall = ctx.call
    grad = _statistics_gradient(call, grads[1:])
    summed = call.transport.sum_gradients(grad.double()).to(call.merged.dtype)  # type: ignore[union-attr]
    return _input_gradients(ctx, raw_dy, grads, summed)


def _input_gradient(call: LayerCall, grad_output: Optional[Tensor], input: Tensor, weight: Optional[Tensor],
                    slope: Tensor, offset: Tensor) -> Tensor:
    """``scale * dy + slope * (x - mean) + offset`` per channel, in two passes over the slice."""
    if input.numel() == 0:
        return torch.zeros_like(input)
    device = input.device
    mean = call.statistics(device)[0]
    invstd, _, ones = call.coefficients(device)
    accumulate = input.dtype != mean.dtype  # half input: accumulate in float32
    grad = centred_affine(input.to(mean.dtype) if accumulate else input, mean, _on(device, slope),
                          _on(device, offset), ones)
    if grad_output is not None:
        scale = _scale(invstd, weight)
        grad.addcmul_(grad_output.to(mean.dtype) if accumulate else grad_output, scale.view(channel_view_shape(input)))
    return grad.to(input.dtype) if accumulate else grad


def centred_affine(input: Tensor, centre: Tensor, scale: Tensor, shift: Tensor, ones: Tensor) -> Tensor:
    """``(input - centre) * scale + shift`` per channel, in one fused pass.

    PyTorch's eval-mode BatchNorm kernel with a unit variance (``ones``) and no eps.
    """
    return torch.native_batch_norm(input, scale, shift, centre, ones, False, 0.0, 0.0)[0]


# -- normalization ---------------------------------------------------------------
def sum_output_gradients(grad_output: Tensor, input: Tensor, mean: Tensor, var: Tensor, eps: float,
                         ones: Tensor) -> tuple[Tensor, Tensor]:
    """One fused pass: (sum(dy * xhat), sum(dy)) per channel, xhat normalized with (mean, var).

    ``ones`` stands for the weight, which the sums do not depend on (CUDA's
    kernel wants one to size them).
    """
    if input.numel() == 0:
        # PyTorch's kernel divides by the element count; an empty slice adds nothing.
        return torch.zeros_like(mean), torch.zeros_like(mean)
    # Empty save_mean/save_invstd mean "eval mode: use the running statistics" to
    # CUDA's kernel (as cuDNN's eval backward passes them); None trips its assert.
    unused = mean.new_empty(0)
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_output, input, ones, mean, var, unused, unused, False, eps, [False, True, True],
    )
    return sum_dy_xhat, sum_dy


class _Normalize(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the merged statistics of ``call``.

    Backward returns the gradient of this part's copy of the statistics, of
    weight and bias, and dy's direct share of dx for the merge node to finish
    (see :class:`_MergeStatistics`). Under the classic 'clamp' eps mode the
    variance is clamped at eps instead, and a clamped channel's variance gets
    no gradient.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, stats: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                call: LayerCall, part: int) -> Tensor:
        mean, variance = call.statistics(input.device)
        ctx.call, ctx.part, ctx.merge_node = call, part, stats.grad_fn
        # The merge node saved the input; without one (no input or weight needs grad), save it here.
        ctx.save_for_backward(input if ctx.merge_node is None else None, stats, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # PyTorch's mixed-precision kernels want float32 weight and bias with the float32 statistics of a half input.
        return torch.native_batch_norm(input, as_dtype(weight, mean.dtype), as_dtype(bias, mean.dtype),
                                       mean, variance, False, 0.0, call.kernel_eps)[0]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        input, stats, weight = ctx.saved_tensors
        if ctx.merge_node is not None:
            input = ctx.merge_node.saved_tensors[ctx.part]
        call: LayerCall = ctx.call
        need_input, need_stats, need_weight, need_bias = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            # create_graph=True (double backward): composite, differentiable ops,
            # with the statistics as functions of every part's input.
            mean, var = stats[0], stats[1]
            variance = var.clamp(min=call.eps) if call.clamp else var
            invstd = (variance + call.kernel_eps).rsqrt()
            scale = _scale(invstd, weight)
            shape, dims = channel_view_shape(input), reduction_dims(input)
            dy = grad_output.to(mean.dtype)
            sum_dy = dy.sum(dims)
            sum_dy_xhat = (dy * ((input.to(mean.dtype) - mean.view(shape)) * invstd.view(shape))).sum(dims)
            grad_var = scale * invstd * sum_dy_xhat * -0.5
            if call.clamp:
                grad_var = grad_var * (var >= call.eps)
            grad_stats = torch.stack([(scale * sum_dy).neg(), grad_var]) if need_stats else None
            grad_input = (dy * scale.view(shape)).to(input.dtype) if need_input else None
        else:
            mean, variance = call.statistics(input.device)
            invstd, coefficients, ones = call.coefficients(input.device)
            sum_dy_xhat, sum_dy = sum_output_gradients(grad_output, input, mean, variance, call.kernel_eps, ones)
            grad_stats = None
            if need_stats:
                grad_stats = torch.stack([sum_dy, sum_dy_xhat]).mul_(coefficients)
                if weight is not None:
                    grad_stats.mul_(as_dtype(weight, invstd.dtype))
            if ctx.merge_node is not None:
                grad_input = grad_output  # dy itself: the merge node scales it as it forms dx
            elif need_input:
                scale = _scale(invstd, weight)
                grad_input = (grad_output * scale.view(channel_view_shape(input))).to(input.dtype)
            else:
                grad_input = None
        grad_weight = as_dtype(sum_dy_xhat, weight.dtype) if need_weight else None
        grad_bias = as_dtype(sum_dy, ctx.bias_dtype) if need_bias else None
        return grad_input, grad_stats, grad_weight, grad_bias, None, None


# -- the call --------------------------------------------------------------------
def sync_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    exchange: Exchange) -> tuple[Tensor, LayerCall]:
    """Batch-normalize ``input`` with statistics merged across parts by ``exchange``.

    Returns the output and the layer call (its merged mean, biased variance
    and value count per channel). Every part sees the same total, so a whole
    batch of one value per channel raises PyTorch's ``ValueError`` in every
    part alike; an empty whole batch gives empty outputs, as PyTorch does.
    """
    share = exchange(input, weight, values_per_channel(input), local_moments(input), eps)
    call = share.call
    if call.total == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {call.total} value(s) per "
            f"channel over the whole batch (input size of this part {list(input.shape)})"
        )
    return _Normalize.apply(share.input, share.stats, weight, bias, call, share.part), call


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
               exchange: Exchange, updates_running_stats: bool) -> Tensor:
    """``F.batch_norm(..., training=True)`` with whole-batch statistics from ``exchange``.

    The running statistics are the tensors passed, updated from the merged
    statistics with the momentum passed (the unbiased variance), exactly as
    the call would have on one device, by the part that owns them.
    """
    check_arguments(input, running_mean, running_var, weight, bias, momentum, eps)
    output, call = sync_batch_norm(input, weight, bias, eps, exchange)
    if updates_running_stats and call.total > 0:  # an empty whole batch leaves them, as PyTorch does
        update_running_stats(running_mean, running_var, call.mean, call.var, call.total, float(momentum))
    return output
