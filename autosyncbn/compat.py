"""``patch_sync_batchnorm``: the classic ``sync_batchnorm`` context manager.

With it, ``set_sbn_eps_mode`` (``eps_mode.py``), the classes,
``DataParallelWithCallback``, ``patch_replication_callback`` and
``convert_model``, a project that used ``sync_batchnorm`` switches by changing
its import (``python -m autosyncbn migrate`` does that for a whole tree).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn
import torch.nn.modules as nn_modules
import torch.nn.modules.batchnorm as nn_batchnorm

from .modules import SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d
from .wrapping import Patch, SharedPatches

_REPLACEMENTS = {
    "BatchNorm1d": SynchronizedBatchNorm1d,
    "BatchNorm2d": SynchronizedBatchNorm2d,
    "BatchNorm3d": SynchronizedBatchNorm3d,
}
_REBINDINGS = SharedPatches(lambda: [
    Patch(namespace, name, replacement=replacement)
    for namespace in (nn, nn_modules, nn_batchnorm)
    for name, replacement in _REPLACEMENTS.items()
])


@contextlib.contextmanager
def patch_sync_batchnorm() -> Iterator[None]:
    """Within the block, ``nn.BatchNorm1d/2d/3d(...)`` construct synchronized layers.

    Rebinds the names in ``torch.nn``, ``torch.nn.modules`` and
    ``torch.nn.modules.batchnorm`` (as the classic context manager does) and
    restores them on exit, even after an exception. References imported before
    the block (``from torch.nn import BatchNorm2d``) are not affected. Nests,
    also across threads: the last block out restores.

    Examples::

        >>> with autosyncbn.patch_sync_batchnorm():
        ...     model = torchvision.models.resnet50()   # builds SynchronizedBatchNorm2d
    """
    _REBINDINGS.acquire()
    try:
        yield
    finally:
        _REBINDINGS.release()
