"""Exceptions and warnings raised when replicas or ranks cannot be synchronized.

Every message says what was expected and what was found, and names the
layer (its qualified name), the replica or rank, and the synchronized call
number. Replica calls are counted from 0 within one DataParallel forward;
process-group calls are counted from 0 per process group (forward calls; a
backward carries the number of its forward), and after a disagreement every
rank restarts at one common number.
"""
from __future__ import annotations


class SyncBatchNormError(RuntimeError):
    """Base class: synchronized BatchNorm could not complete this forward pass."""


class ReplicaMismatchError(SyncBatchNormError):
    """Replicas (or ranks) disagree: a different layer, channel count, number of calls or direction."""


class PeerFailedError(SyncBatchNormError):
    """Another replica raised, so the statistics this replica waits for will never come."""


class SyncTimeoutError(SyncBatchNormError, TimeoutError):
    """A peer did not reach the same BatchNorm call before the deadline."""


class CheckpointRecomputeError(SyncBatchNormError):
    """A synchronized layer ran again after its replica's forward ended, outside a recompute.

    ``torch.utils.checkpoint`` recomputes are fine: they replay the statistics
    of the call they recompute. This is a replica module called again after
    the step (kept and called later), which no peer can meet any more.
    """


class UnsynchronizedBatchNormWarning(UserWarning):
    """A BatchNorm layer in a DataParallel replica normalized per slice although autosyncbn is installed.

    Raised once per layer, with the reason: its replica was not prepared by
    autosyncbn, or its statistics never passed through
    ``torch.nn.functional.batch_norm``. Layers excluded on purpose never warn.
    """
