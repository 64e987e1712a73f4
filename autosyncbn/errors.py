"""Exceptions raised when replicas or ranks cannot be synchronized.

Every message says what was expected and what was found, and names the
layer, the replica (or rank) and the BatchNorm call number (counted from 0
within one forward pass).
"""
from __future__ import annotations


class SyncBatchNormError(RuntimeError):
    """Base class: synchronized BatchNorm could not complete this forward pass."""


class ReplicaMismatchError(SyncBatchNormError):
    """Replicas (or ranks) disagree: a different layer, channel count or number of calls."""


class PeerFailedError(SyncBatchNormError):
    """Another replica raised, so the statistics this replica waits for will never come."""


class SyncTimeoutError(SyncBatchNormError, TimeoutError):
    """A peer did not reach the same BatchNorm call before the deadline."""


class CheckpointRecomputeError(SyncBatchNormError):
    """A synchronized layer ran again after its replica's forward ended.

    ``torch.utils.checkpoint`` recomputes the forward during backward, one
    replica at a time, so the replicas can never meet again.
    """
