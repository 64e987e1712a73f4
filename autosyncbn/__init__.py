"""autosyncbn: synchronized BatchNorm for ``nn.DataParallel`` and ``torch.distributed`` in one line.

>>> import autosyncbn
>>> autosyncbn.install()   # every nn.DataParallel now synchronizes BatchNorm statistics
"""
from .compat import patch_sync_batchnorm
from .eps_mode import get_sbn_eps_mode, set_sbn_eps_mode
from .errors import (
    CheckpointRecomputeError,
    PeerFailedError,
    ReplicaMismatchError,
    SyncBatchNormError,
    SyncTimeoutError,
)
from .modules import (
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    convert_model,
    exclude,
    include,
    revert_model,
)
from .parallel import DataParallelWithCallback, patch_replication_callback
from .patching import install, is_installed, patched, uninstall

__version__ = "0.1.0"

__all__ = [
    "CheckpointRecomputeError",
    "DataParallelWithCallback",
    "PeerFailedError",
    "ReplicaMismatchError",
    "SyncBatchNormError",
    "SyncTimeoutError",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "convert_model",
    "exclude",
    "get_sbn_eps_mode",
    "include",
    "install",
    "is_installed",
    "patch_replication_callback",
    "patch_sync_batchnorm",
    "patched",
    "revert_model",
    "set_sbn_eps_mode",
    "uninstall",
]
