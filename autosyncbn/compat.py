"""``patch_sync_batchnorm``: the classic ``sync_batchnorm`` context manager.

With it, ``set_sbn_eps_mode`` (``eps_mode.py``), the classes,
``DataParallelWithCallback``, ``patch_replication_callback`` and
``convert_model``, a project that used ``sync_batchnorm`` switches by changing
its import.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch.nn as nn
import torch.nn.modules as nn_modules
import torch.nn.modules.batchnorm as nn_batchnorm

from .modules import SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d

_NAMESPACES = (nn, nn_modules, nn_batchnorm)
_REPLACEMENTS = {
    "BatchNorm1d": SynchronizedBatchNorm1d,
    "BatchNorm2d": SynchronizedBatchNorm2d,
    "BatchNorm3d": SynchronizedBatchNorm3d,
}
_patch_lock = threading.Lock()
_patch_depth = 0
_patch_originals: dict = {}


@contextlib.contextmanager
def patch_sync_batchnorm() -> Iterator[None]:
    """Within the block, ``nn.BatchNorm1d/2d/3d(...)`` construct synchronized layers.

    Rebinds the names in ``torch.nn``, ``torch.nn.modules`` and
    ``torch.nn.modules.batchnorm`` (as the classic context manager does) and
    restores them on exit, even after an exception. References imported before
    the block (``from torch.nn import BatchNorm2d``) are not affected. Nests.

    Examples::

        >>> with autosyncbn.patch_sync_batchnorm():
        ...     model = torchvision.models.resnet50()   # builds SynchronizedBatchNorm2d
    """
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            for namespace in _NAMESPACES:
                for name, replacement in _REPLACEMENTS.items():
                    _patch_originals[(namespace, name)] = vars(namespace)[name]
                    setattr(namespace, name, replacement)
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                for (namespace, name), original in _patch_originals.items():
                    setattr(namespace, name, original)
                _patch_originals.clear()
