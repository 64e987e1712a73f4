"""Synchronized batch normalization: one autograd Function, one backward formula, any transport.

One layer call in this process normalizes every part of the batch that
lives here (DataParallel: every replica's slice; a process: its own slice)
with the whole batch's statistics, merged beforehand from every part's
moments (``moments.chan_merge``; other processes' come through a transport).
The last replica to arrive merges and makes the call's one autograd node,
:class:`_SynchronizedNormalization`, whose backward is the one formula of
synchronized BatchNorm (PyTorch's ``SyncBatchNorm`` has the same)::

    per part:             sum(dy), sum(dy * xhat)
    over every part:      added here, then over the transport (processes)
    dx = weight * invstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)

and each part then fills its own output (:func:`normalize_part`), so the
kernels run side by side. A layer call saves each part's input once, plus
per-channel vectors, what ``nn.BatchNorm`` saves. Between replica threads
nothing in backward waits for a peer (on CPU autograd runs every replica's
backward in one thread); between processes the sums cross in one collective. With
``create_graph=True`` the same formula runs on differentiable ops, with the
statistics recomputed from every part's input (threads), so double backward
(gradient penalties) matches one device.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .eps_mode import get_sbn_eps_mode
from .errors import SyncBatchNormError
from .moments import HALF_TYPES, accumulation_dtype, chan_merge, channel_view_shape, reduction_dims, with_precise_means
from .private_api import FORWARD_AD, function_apply, operator


class MomentsTransport(Protocol):
    """How per-part moments and backward sums travel between processes (one per layer call)."""

    def gather(self, count: int, mean: Tensor, var: Tensor) -> "tuple[list[int], Tensor]":
        """Every part's value count and (mean, var), stacked as (parts, 2, C)."""

    def sum_gradients(self, grad: Tensor) -> Tensor:
        """A (2, C) tensor summed over every part."""


# -- argument checks: PyTorch's errors, raised before any peer is involved -----
def check_arguments(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: Any, eps: float) -> None:
    """Raise what ``F.batch_norm`` raises in training for these arguments, with its types."""
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for \'{str(input.dtype)[6:].capitalize()}\'')
    if not isinstance(momentum, (int, float, Tensor)) or isinstance(momentum, bool):
        raise TypeError(f"batch_norm(): argument 'momentum' must be float, not {type(momentum).__name__}")
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if FORWARD_AD._current_level >= 0 and FORWARD_AD.unpack_dual(input).tangent is not None:
        raise SyncBatchNormError(
            "forward-mode AD (torch.autograd.forward_ad) through a synchronized BatchNorm call is not "
            "supported: its tangent would need every replica's or rank's tangent. Use reverse mode "
            "(backward, torch.autograd.grad), or exclude the layer (autosyncbn.exclude) to run it per slice.")
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
        if tensor.dtype != input.dtype and not (input.dtype in HALF_TYPES and tensor.dtype == torch.float32):
            raise RuntimeError(
                f"mixed dtype: {name} is {tensor.dtype} but the input is {input.dtype}; "
                f"PyTorch's BatchNorm needs them to match (float32 statistics are allowed "
                f"only with a float16/bfloat16 input)"
            )


# -- one layer call ---------------------------------------------------------------
class LayerCall:
    """The whole batch's statistics for one synchronized layer call, and how to normalize with them.

    Plain values (no autograd node, no output of one), so a graph never keeps
    itself alive through it. ``merged`` is the float64 (mean, biased var) the
    running statistics are updated from; the kernels use them in the input's
    accumulation dtype. Under the classic 'clamp' eps mode the kernel's
    variance is ``max(var, eps)`` with no eps added, and a clamped channel's
    variance gets no gradient (``var_mask``).
    """

    __slots__ = ("eps", "invstd", "kernel_eps", "kernel_var", "mean", "merged", "total", "transport", "var",
                 "var_mask", "wide")

    def __init__(self, merged: Tensor, total: int, eps: float, dtype: torch.dtype,
                 transport: Optional[MomentsTransport] = None, wide: bool = False) -> None:
        self.merged = merged
        self.wide = wide
        self.mean, self.var = merged.to(dtype).unbind()
        self.total = total
        self.eps = eps
        self.transport = transport
        if get_sbn_eps_mode() == "clamp":
            self.kernel_var, self.kernel_eps = self.var.clamp(min=eps), 0.0
            self.var_mask: Optional[Tensor] = (self.var >= eps).to(self.var.dtype)
        else:
            self.kernel_var, self.kernel_eps, self.var_mask = self.var, eps, None
        self.invstd = (self.kernel_var + self.kernel_eps).rsqrt()


def pack_part(hooks: "tuple[Callable, Callable]", input: Tensor, weight: Optional[Tensor]) -> tuple:
    """One part's saved tensors packed by the saved-tensor hooks of the thread it runs in.

    Autograd packs what a node saves with the hooks of the thread that makes
    the node; a synchronized node is made by one replica for all, so each
    replica packs its own input and weight here, in its own thread, where its
    hooks are: activation checkpointing (each replica's recompute brings back
    its own tensors), ``save_on_cpu``, a memory ledger.
    """
    pack, unpack = hooks
    return unpack, pack(input), None if weight is None else pack(weight)


def _unpacked(packed: Sequence[tuple]) -> tuple[list, list]:
    """Every part's input and weight, back from :func:`pack_part` (or as kept: no hooks there)."""
    inputs, weights = [], []
    for unpack, input, weight in packed:
        inputs.append(input if unpack is None else unpack(input))
        weights.append(weight if unpack is None or weight is None else unpack(weight))
    return inputs, weights


class _SynchronizedNormalization(torch.autograd.Function):
    """Every local part's input, weight and bias -> every part's output, one node per layer call.

    Inputs: the :class:`LayerCall`, the parts' packed tensors (None: no part
    runs under saved-tensor hooks, so the node saves them itself), the number
    of parts P, then x_1..x_P, weight_1..weight_P, bias_1..bias_P (DataParallel
    gives every replica its own copy of the parameters). The outputs it makes
    are empty: each part fills its own with :func:`normalize_part`, so replica
    threads run their normalization kernels side by side.
    """

    @staticmethod
    def forward(ctx: Any, call: LayerCall, packed: Optional[Sequence[tuple]], parts: int,
                *tensors: Optional[Tensor]) -> tuple[Tensor, ...]:
        ctx.call, ctx.parts, ctx.packed = call, parts, packed
        ctx.bias_dtypes = [None if bias is None else bias.dtype for bias in tensors[2 * parts:]]
        ctx.set_materialize_grads(False)
        if packed is None:
            ctx.save_for_backward(*tensors[:2 * parts])
        return tuple(torch.empty_like(input) for input in tensors[:parts])  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        parts = ctx.parts
        if ctx.packed is None:
            saved = ctx.saved_tensors
            inputs, weights = saved[:parts], saved[parts:]
        else:
            inputs, weights = _unpacked(ctx.packed)
        if ctx.call.transport is not None and torch.is_grad_enabled():
            with torch.no_grad():
                gradients = _gradients(ctx.call, inputs, weights, ctx.bias_dtypes, grad_outputs,
                                       ctx.needs_input_grad[3:])
            if any(t is not None and t.requires_grad for t in (*inputs, *weights, *grad_outputs)):
                gradients = refuse_second_backward(gradients)
        else:
            gradients = _gradients(ctx.call, inputs, weights, ctx.bias_dtypes, grad_outputs,
                                   ctx.needs_input_grad[3:])
        return (None, None, None, *gradients)


_apply_normalization = function_apply(_SynchronizedNormalization)
"""The node's C ``apply``: ``Function.apply``'s Python preamble serves only torch.func transforms,
which synchronized calls refuse (dispatch raises a clear error under them)."""


def normalize(call: LayerCall, inputs: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
              biases: Sequence[Optional[Tensor]], packed: Optional[Sequence[Optional[tuple]]] = None
              ) -> tuple[Tensor, ...]:
    """Every local part's output, made by one autograd node, still to be filled by :func:`normalize_part`.

    ``packed``: every part's :func:`pack_part` result (None for a part without
    hooks), or None when no part has saved-tensor hooks.
    """
    if packed is not None:
        packed = [(None, input, weight) if part is None else part
                  for part, input, weight in zip(packed, inputs, weights)]
    return _apply_normalization(call, packed, len(inputs), *inputs, *weights, *biases)


def normalize_part(call: LayerCall, output: Tensor, input: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor]) -> Tensor:
    """Fill one part's ``output`` (made by :func:`normalize`) with PyTorch's eval kernel: ``input``
    normalized with the merged statistics. The values only: autograd's record is the node's."""
    dtype = call.mean.dtype
    # PyTorch's kernel: float32 weight and bias with a half input's float32 statistics.
    if weight is not None:
        weight = weight.detach() if weight.dtype == dtype else weight.detach().to(dtype)
    if bias is not None:
        bias = bias.detach() if bias.dtype == dtype else bias.detach().to(dtype)
    mean, var = call.mean, call.kernel_var
    if input.device != mean.device:
        mean, var = mean.to(input.device), var.to(input.device)
    if call.wide and input.dtype == dtype:
        _normalize_wide(call, output.detach(), input.detach(), mean, weight, bias)
        return output
    unused = mean.new_empty(0)
    _NORMALIZE_INTO(input.detach(), weight, bias, mean, var, False, 0.0, call.kernel_eps, out=output.detach(),
                    save_mean=unused, save_invstd=unused)
    return output


def _normalize_wide(call: LayerCall, output: Tensor, input: Tensor, mean: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor]) -> None:
    """``(x - mean) * (invstd * weight) + bias``, the mean subtracted first.

    PyTorch's kernel computes ``x * a + b`` with ``b = bias - mean * a``: for
    a large mean and a small spread, ``x * a`` and ``b`` are large and nearly
    cancel, losing the digits that matter. Subtracting first is exact there
    (x and mean are close). Three passes instead of one, for wide inputs only.
    """
    shape = channel_view_shape(input)
    scale = call.invstd.to(input.device) if weight is None else call.invstd.to(input.device) * weight
    torch.sub(input, mean.view(shape), out=output)
    output.mul_(scale.view(shape))
    if bias is not None:
        output.add_(bias.view(shape))


_NORMALIZE_INTO = operator(torch.ops.aten.native_batch_norm.out)
"""PyTorch's batch-norm kernel writing into a given tensor (eval mode: with given statistics)."""


def merge_parts(counts: Sequence[int], moments: Sequence["tuple[Tensor, Tensor]"], eps: float,
                inputs: Sequence[Tensor], weights: Sequence[Optional[Tensor]], biases: Sequence[Optional[Tensor]],
                packed: Sequence[Optional[tuple]] = ()) -> tuple[LayerCall, tuple[Tensor, ...]]:
    """Every part lives in this process (DataParallel replica threads): merge here, make every part's output."""
    device = moments[0][0].device
    values: list[Tensor] = []
    for pair in moments:  # on the first part's device (DataParallel's GPUs: every device's own)
        values.extend(pair if pair[0].device == device else (v.to(device) for v in pair))
    stacked, wide = with_precise_means(torch.stack(values).view(len(moments), 2, -1), inputs)
    call = LayerCall(chan_merge(tuple(counts), stacked), sum(counts), eps, accumulation_dtype(inputs[0].dtype),
                     wide=wide)
    return call, normalize(call, inputs, weights, biases, None if packed.count(None) == len(packed) else packed)


def merge_over(transport: MomentsTransport, input: Tensor, count: int, moments: "tuple[Tensor, Tensor]",
               eps: float) -> LayerCall:
    """This process's one part, its peers other processes reached through ``transport``: the whole
    batch's statistics (then :func:`normalize` and :func:`normalize_part`)."""
    local, wide = with_precise_means(torch.stack(moments).unsqueeze(0), (input,))
    counts, gathered = transport.gather(count, local[0, 0], local[0, 1])
    return LayerCall(chan_merge(tuple(counts), gathered), sum(counts), eps, accumulation_dtype(input.dtype), transport,
                     wide)


# -- backward: the one formula -------------------------------------------------------
def _gradients(call: LayerCall, inputs: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
               bias_dtypes: Sequence[Optional[torch.dtype]], grad_outputs: Sequence[Optional[Tensor]],
               needs: Sequence[bool]) -> list[Optional[Tensor]]:
    """dx, d(weight) and d(bias) of every part, in the node's input order.

    ``grad_outputs[i]`` is None where part i's output was not used (it adds
    nothing to the sums and gets a dx from the statistics alone).
    """
    parts = len(inputs)
    differentiable = torch.is_grad_enabled()
    mean, invstd = call.mean, call.invstd
    if differentiable and call.transport is None:
        # create_graph=True: the statistics as functions of every part's input,
        # so second derivatives see them move.
        mean, invstd = _differentiable_statistics(call, inputs)
    home = mean.device
    sums: list[Optional[tuple[Tensor, Tensor]]] = [None] * parts  # (sum dy, sum dy * xhat), on the part's device
    part: Optional[tuple[Tensor, Tensor]]  # a declaration only: no code
    sum_dy = sum_dy_xhat = None  # over every part, added in part order (no thread timing)
    for index, (input, grad) in enumerate(zip(inputs, grad_outputs)):
        if grad is None:
            continue
        part = _part_sums(call, input, grad, mean, invstd, differentiable)
        sums[index] = part
        dy, dy_xhat = part if input.device == home else (part[0].to(home), part[1].to(home))
        sum_dy = dy if sum_dy is None else sum_dy + dy
        sum_dy_xhat = dy_xhat if sum_dy_xhat is None else sum_dy_xhat + dy_xhat
    if call.transport is not None:  # float64 across processes, as the moments
        local = (torch.stack([sum_dy, sum_dy_xhat]) if sum_dy is not None else  # type: ignore[list-item]
                 torch.zeros(2, *mean.shape, dtype=mean.dtype, device=home))
        sum_dy, sum_dy_xhat = call.transport.sum_gradients(local.double()).to(mean.dtype).unbind()
    results: list[Optional[Tensor]] = [None] * (3 * parts)
    if sum_dy is not None and any(needs[:parts]):
        # dx = scale * (dy - sum(dy)/N - xhat * sum(dy xhat)/N) = scale * dy + slope * (x - mean) + offset,
        # per channel, for every part at once (each replica has its own copy of the weight).
        scales = (invstd.expand(parts, -1) if weights[0] is None else
                  invstd * torch.stack([w.to(device=home, dtype=invstd.dtype) for w in weights]))  # type: ignore[union-attr]
        per_value = -1.0 / call.total if call.total else 0.0  # an empty batch: nothing to spread
        per_xhat = sum_dy_xhat * invstd * per_value  # type: ignore[operator]
        if call.var_mask is not None:  # 'clamp': a clamped variance gets no gradient
            per_xhat = per_xhat * call.var_mask
        slopes, offsets = scales * per_xhat, scales * (sum_dy * per_value)
        for index, (input, grad) in enumerate(zip(inputs, grad_outputs)):
            if needs[index]:
                results[index] = _input_gradient(input, grad, mean, scales[index], slopes[index], offsets[index],
                                                 differentiable)
    for index, (part, weight) in enumerate(zip(sums, weights)):
        if part is None:
            continue
        if weight is not None and needs[parts + index]:
            results[parts + index] = part[1] if part[1].dtype == weight.dtype else part[1].to(weight.dtype)
        dtype = bias_dtypes[index]
        if dtype is not None and needs[2 * parts + index]:
            results[2 * parts + index] = part[0] if part[0].dtype == dtype else part[0].to(dtype)
    return results


def part_gradients(call: LayerCall, input: Tensor, weight: Optional[Tensor], grad: Tensor) -> tuple[Tensor, ...]:
    """One part's (dx, sum dy * xhat, sum dy) by the one formula: the backward of the compiled
    operators (``compiled.py``), which must send what eager mode sends."""
    dtype = call.mean.dtype
    if weight is None:
        weight = torch.ones_like(call.mean)  # the scale is then invstd, as without a weight
    grad_input, sum_dy_xhat, sum_dy = _gradients(call, [input], [weight], [dtype], [grad], [True, True, True])
    return grad_input, sum_dy_xhat.to(dtype), sum_dy  # type: ignore[union-attr,return-value]


SECOND_BACKWARD_MESSAGE = (
    "a second backward (create_graph=True, then a backward through the gradient, as in a gradient "
    "penalty) through a BatchNorm synchronized across processes is not supported: its first backward "
    "sums over the ranks outside autograd, so a second one would miss the other ranks' terms. "
    "Synchronize across DataParallel replicas for it, or exclude the layer (autosyncbn.exclude).")


class _SecondBackwardRefused(torch.autograd.Function):
    """The first backward's gradients, as they are; differentiating them raises.

    Over a transport the sums cross processes outside autograd, so a second
    backward would silently miss the other ranks' terms. (PyTorch's
    ``once_differentiable`` cannot say so here: it looks for tensors among its
    direct arguments, and these come in sequences.)
    """

    @staticmethod
    def forward(ctx: Any, *gradients: Tensor) -> tuple[Tensor, ...]:
        return tuple(gradient.view_as(gradient) for gradient in gradients)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise SyncBatchNormError(SECOND_BACKWARD_MESSAGE)


def refuse_second_backward(gradients: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """``gradients`` (computed without a graph) made to raise :data:`SECOND_BACKWARD_MESSAGE` if differentiated."""
    present = [index for index, gradient in enumerate(gradients) if gradient is not None]
    refused = _SecondBackwardRefused.apply(*[gradients[index].detach().requires_grad_()  # type: ignore[union-attr]
                                             for index in present])
    results = list(gradients)
    for index, gradient in zip(present, refused):
        results[index] = gradient
    return results


def _differentiable_statistics(call: LayerCall, inputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(mean, invstd) recomputed from every local part's input with differentiable ops."""
    device, dtype = call.mean.device, call.mean.dtype
    values = [x.to(device=device, dtype=dtype) for x in inputs]
    total = call.total or 1  # an empty batch: zero sums
    # sum() starts at 0, so to mypy these may be floats; values is never empty (one part at least).
    mean: Tensor = sum(x.sum(reduction_dims(x)) for x in values) / total  # type: ignore[assignment]
    var: Tensor = sum(  # type: ignore[assignment]
        (x - mean.view(channel_view_shape(x))).square().sum(reduction_dims(x)) for x in values) / total
    var = var.clamp(min=call.eps) if call.var_mask is not None else var
    return mean, (var + call.kernel_eps).rsqrt()


def _part_sums(call: LayerCall, input: Tensor, grad: Tensor, mean: Tensor, invstd: Tensor,
               differentiable: bool) -> tuple[Tensor, Tensor]:
    """(sum(dy), sum(dy * xhat)) of one part, on its device.

    PyTorch's fused eval-mode backward kernel (one pass) when no graph is
    built; differentiable ops under ``create_graph=True``.
    """
    device = input.device
    if input.numel() == 0:  # an empty part adds nothing (PyTorch's kernel rejects it)
        return torch.zeros_like(mean, device=device), torch.zeros_like(mean, device=device)
    if not differentiable:
        var = call.kernel_var
        if device != mean.device:
            mean, var = mean.to(device), var.to(device)
        # Empty save_mean/save_invstd mean "eval mode" to CUDA's kernel; the weight
        # (ones) only sizes the sums, which do not depend on it.
        unused = mean.new_empty(0)
        _, sum_dy_xhat, sum_dy = _BACKWARD_KERNEL(grad, input, torch.ones_like(mean), mean, var, unused, unused,
                                                   False, call.kernel_eps, [False, True, True])
        return sum_dy, sum_dy_xhat
    shape, dims = channel_view_shape(input), reduction_dims(input)
    dy = grad.to(mean.dtype)
    xhat = (input.to(mean.dtype) - mean.to(device).view(shape)) * invstd.to(device).view(shape)
    return dy.sum(dims), (dy * xhat).sum(dims)


_BACKWARD_KERNEL = operator(torch.ops.aten.native_batch_norm_backward.default)
"""The operator itself (its Python ``OpOverload`` wrapper costs a call per use)."""


def _input_gradient(input: Tensor, grad: Optional[Tensor], mean: Tensor, scale: Tensor, slope: Tensor,
                    offset: Tensor, differentiable: bool) -> Tensor:
    """``scale * dy + slope * (x - mean) + offset`` per channel, in the input's dtype."""
    device = input.device
    if device != mean.device:
        mean, scale, slope, offset = mean.to(device), scale.to(device), slope.to(device), offset.to(device)
    shape = [1] * input.dim()
    shape[1] = -1
    if not differentiable and input.numel():
        # Two fused passes: PyTorch's eval kernel with a unit variance is (x - mean) * slope + offset.
        # A half input is carried in float32 and rounded once, as PyTorch's own backward does.
        carried = input if input.dtype == mean.dtype else input.to(mean.dtype)
        dx = torch.native_batch_norm(carried, slope, offset, mean, torch.ones_like(mean), False, 0.0, 0.0)[0]
        if grad is not None:
            dx = dx.addcmul_(grad if grad.dtype == dx.dtype else grad.to(dx.dtype), scale.view(shape))
        return dx if dx.dtype == input.dtype else dx.to(input.dtype)
    dx = (input.to(mean.dtype) - mean.view(shape)) * slope.view(shape) + offset.view(shape)
    if grad is not None:
        dx = dx + grad.to(mean.dtype) * scale.view(shape)
    return dx.to(input.dtype)
