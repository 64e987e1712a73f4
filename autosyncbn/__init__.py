"""autosyncbn: synchronized BatchNorm for ``nn.DataParallel`` and ``torch.distributed`` in one line.

>>> import autosyncbn
>>> autosyncbn.install()   # every nn.DataParallel now synchronizes BatchNorm statistics

How one call flows (each box is one module; imports only point down)::

    install()/patched()  patching ──► wrapping.Patch on F.batch_norm and parallel_apply
    DataParallelWithCallback  parallel        settings: the options each thread sees
          │
          ▼  parallel_apply, once per forward
    replicas.run_parallel ── decides the forward's plan; makes its group.ReplicaGroup;
          │                  runs each replica inside its context.ReplicaContext
          ▼  every batch-statistics call: F.batch_norm (patched) or Synchronized*d
    dispatch.batch_norm ── decide(): replica group, process group, or PyTorch's own
          │                ──► group.ReplicaGroup (threads)   distributed.ProcessGroupTransport
          ▼
    functional.batch_norm ── local moments ─► exchange: Chan merge (moments.chan_merge)
                             ─► _MergeStatistics (one node per layer call) ─► _Normalize per part
                             running statistics updated by their owner (replica 0, every rank)
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

__version__ = "0.2.0"

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
