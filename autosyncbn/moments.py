"""Per-channel moments: local statistics, the stable parallel merge, running stats.

Pure tensor math with no threads and no processes, so every backend (replica
threads, process groups) shares one definition of "the statistics".
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

HALF_TYPES = (torch.float16, torch.bfloat16)
"""Inputs whose statistics are accumulated in float32."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_view_shape(input: Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``input``: (1, C, 1, ...)."""
    shape = [1] * input.dim()
    shape[1] = input.shape[1]
    return shape


def reduction_dims(input: Tensor) -> list[int]:
    """Every dimension but the channel dimension (1)."""
    return [0, *range(2, input.dim())]


def local_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of ``input``, in the accumulation dtype.

    PyTorch's own statistics kernel (the numerics of ``nn.BatchNorm``). Half
    inputs get float32 scratch buffers so the kernel returns float32
    statistics; momentum 0 leaves the scratch untouched. An empty input has
    zero mean and variance (its count, 0, gives it no weight). Not
    differentiable: the statistics' gradient is formed by ``functional``.
    """
    channels = input.shape[1]
    input = input.detach()
    if input.numel() == 0:
        # An empty slice contributes nothing (and PyTorch's kernel rejects it).
        zeros = torch.zeros(channels, dtype=accumulation_dtype(input.dtype), device=input.device)
        return zeros, zeros
    if input.dtype in HALF_TYPES:
        scratch_mean = torch.zeros(channels, dtype=torch.float32, device=input.device)
        scratch_var = torch.ones(channels, dtype=torch.float32, device=input.device)
        return torch.batch_norm_update_stats(input, scratch_mean, scratch_var, 0.0)
    return torch.batch_norm_update_stats(input, None, None, 0.0)


WIDE_MEAN = 4.0
"""Channels whose mean exceeds this many standard deviations get float64 means (see with_precise_means)."""


def with_precise_means(moments: Tensor, inputs: Sequence[Tensor]) -> tuple[Tensor, bool]:
    """The parts' (parts, 2, C) moments in float64, float32 parts' means summed again in float64
    where needed; and whether they were (the input is *wide*: a large mean, a small spread).

    PyTorch's kernel sums a float32 input's mean in float64 but returns it
    rounded to float32, and Chan's merge squares each part's distance to the
    whole batch's mean. Where a mean is more than ``WIDE_MEAN`` standard
    deviations from 0, that rounding (1e-3 at a mean of 3e4) would cost more
    precision than one device loses, so every part's mean is summed again in
    float64 (one more pass each). On a GPU it always is: the pass is cheap
    there, and testing first would make the host wait for the device (a GPU
    input is never called wide). Tested once per layer call, on every part's
    moments at once.
    """
    moments = moments.double()
    first = inputs[0]
    if first.dtype != torch.float32:
        return moments, False
    wide = first.is_cuda or bool((moments[:, 0].abs() > WIDE_MEAN * moments[:, 1].sqrt()).any())
    if not wide:
        return moments, False
    for part, input in enumerate(inputs):
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        if count:
            mean = input.detach().sum(reduction_dims(input), dtype=torch.float64).div_(count)
            moments[part, 0] = mean if mean.device == moments.device else mean.to(moments.device)
    return moments, not first.is_cuda


@functools.lru_cache(maxsize=64)
def count_weights(counts: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """n_i / N, one per part, shaped (parts, 1, 1) (cached: a forward's calls usually share one split)."""
    total = float(sum(counts)) or 1.0  # all-empty: zeros (and nothing to normalize)
    # Cached across calls: never an inference tensor, which backward could not save.
    with torch.inference_mode(False):
        return torch.tensor([n / total for n in counts], dtype=dtype, device=device).view(-1, 1, 1)


def chan_merge(counts: tuple[int, ...], moments: Tensor) -> Tensor:
    """Chan's parallel merge of per-part moments into the whole batch's (2, C) (mean, biased var), in float64.

    ``moments`` is (parts, 2, C): each part's mean and biased variance. The
    merge runs in float64, so it adds no error of its own. With weights
    w_i = n_i / N: ``mean = sum w_i mean_i`` and
    ``var = sum w_i var_i + sum w_i (mean_i - mean)^2``. No large sums are
    subtracted, so inputs with a large mean and a small spread keep their
    precision. The even split (equal counts, the usual case) is the same
    formula with plain means over the parts, in fewer ops: the merge is the
    one step of a synchronized call that the replicas wait for.
    """
    moments = moments.double()
    if len(set(counts)) == 1:
        merged = moments.mean(0)
        merged[1].add_((moments[:, 0] - merged[0]).square_().mean(0))
    else:
        weights = count_weights(counts, moments.device, moments.dtype)
        merged = (moments * weights).sum(0)
        merged[1].add_(((moments[:, :1] - merged[0]).square_() * weights).sum(0)[0])
    return merged


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor,
                         var: Tensor, count: int, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, with the unbiased variance.

    Buffers and statistics never require grad here, so autograd records nothing.
    """
    if running_mean is not None:  # Tensor.to returns the tensor itself when the dtype matches
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
