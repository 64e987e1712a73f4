"""``_BatchNorm.forward`` semantics around a synchronized statistics source.

Both backends (replica threads and process groups) provide a *handle* with
``batch_norm(input, weight, bias, eps) -> (output, mean, var, count)`` and
``updates_running_stats``; this module keeps every ``_BatchNorm`` behaviour
around it: input checks, ``num_batches_tracked``, ``momentum=None``,
``track_running_stats=False``, ``affine=False``.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import process_group_handle
from .moments import running_stats_factor, update_running_stats

SYNC_ATTRIBUTE = "_autosyncbn_sync"
"""Instance attribute holding a layer's sync handle (set on replicas only)."""

EXCLUDED_ATTRIBUTE = "_autosyncbn_excluded"
"""Instance attribute marking a layer that must stay unsynchronized."""


class SyncHandle(Protocol):
    updates_running_stats: bool

    def batch_norm(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> "tuple[Tensor, Tensor, Tensor, int]": ...


def uses_batch_statistics(layer: _BatchNorm) -> bool:
    """PyTorch's own rule: batch statistics in training, and in eval without running stats."""
    return layer.training or (layer.running_mean is None and layer.running_var is None)


def active_handle(layer: _BatchNorm, process_groups: bool, process_group: Any = None) -> Optional[Any]:
    """What this call synchronizes with, or None for PyTorch's own path.

    The replica's handle when the layer is in a DataParallel replica; else,
    when ``process_groups`` allows it and the layer is not excluded, the
    process group's (None unless ``torch.distributed`` runs 2+ ranks there).
    """
    if not uses_batch_statistics(layer):
        return None
    handle = layer.__dict__.get(SYNC_ATTRIBUTE)
    if handle is not None or not process_groups or layer.__dict__.get(EXCLUDED_ATTRIBUTE, False):
        return handle
    return process_group_handle(layer, process_group)


def _check_channels(layer: _BatchNorm, input: Tensor) -> None:
    # PyTorch's kernel raises RuntimeError for a wrong channel count; so do we,
    # before any peer is involved.
    if input.dim() >= 2 and input.shape[1] != layer.num_features:
        raise RuntimeError(
            f"{type(layer).__name__} expected {layer.num_features} channels "
            f"(running_mean should contain {input.shape[1]} elements not "
            f"{layer.num_features}), got input of shape {tuple(input.shape)}"
        )
    if not input.is_floating_point():
        raise RuntimeError(
            f"{type(layer).__name__}: expected a floating point input, got {input.dtype}"
        )


def synchronized_forward(layer: _BatchNorm, input: Tensor, handle: SyncHandle) -> Tensor:
    """Forward of ``layer`` with batch statistics from ``handle`` (training, or eval
    without running statistics)."""
    layer._check_input_dim(input)
    _check_channels(layer, input)
    factor = running_stats_factor(layer) if handle.updates_running_stats else 0.0
    output, mean, var, count = handle.batch_norm(input, layer.weight, layer.bias, layer.eps)
    if (
        handle.updates_running_stats
        and layer.track_running_stats
        and layer.running_mean is not None
        and layer.running_var is not None
    ):
        update_running_stats(layer.running_mean, layer.running_var, mean, var, count, factor)
    return output
