"""autosyncbn: synchronized BatchNorm for ``nn.DataParallel`` and ``torch.distributed`` in one line.

>>> import autosyncbn
>>> autosyncbn.install()   # every nn.DataParallel now synchronizes BatchNorm statistics

How one forward and one call flow (each box is one module; imports only point down)::

    install()/patched()     patching: one table of wrapping.Patch (wrapt) -> F.batch_norm, replicate,
    DataParallelWithCallback, patch_replication_callback  (parallel)         parallel_apply
          |  replicate, once per forward, in the caller's thread
          v
    replicas.register -- the forward's plan and its group.ReplicaGroup; a seat (group, replica,
          |              layer index) on every module of every replica; start/end hooks on roots
          v  every batch-statistics call: F.batch_norm (patched) or an autosyncbn layer
    dispatch.batch_norm -- calling module -> seat -> decide(), once per layer and forward
          v
    group.ReplicaGroup.meet (threads)       distributed.ProcessGroupTransport (processes)
          v
    functional -- moments.chan_merge -> LayerCall -> _SynchronizedNormalization, one autograd
                  node per layer call, one backward formula

The tools (demo, check, migrate, testing, processes, the pytest plugin) live in
``autosyncbn.tools``; ``autosyncbn.testing`` and ``autosyncbn.processes`` are their public paths.
"""
from .compat import patch_sync_batchnorm
from .eps_mode import get_sbn_eps_mode, set_sbn_eps_mode
from .errors import (
    CheckpointRecomputeError,
    PeerFailedError,
    ReplicaMismatchError,
    SyncBatchNormError,
    SyncTimeoutError,
    UnsynchronizedBatchNormWarning,
)
from .modules import (
    SynchronizedBatchNorm,
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
from .report import SyncReport, sync_report

__version__ = "0.3.0"

__all__ = [
    "CheckpointRecomputeError",
    "DataParallelWithCallback",
    "PeerFailedError",
    "ReplicaMismatchError",
    "SyncBatchNormError",
    "SyncReport",
    "SyncTimeoutError",
    "SynchronizedBatchNorm",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "UnsynchronizedBatchNormWarning",
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
    "sync_report",
    "uninstall",
]
