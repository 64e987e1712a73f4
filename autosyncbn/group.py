"""The per-forward meeting point of the N replica threads of one DataParallel call.

The replicate hook makes one ``ReplicaGroup`` per forward. The i-th
synchronized BatchNorm call of every replica meets in slot i; the last replica
to arrive checks that all agree (same layer, same channel count), merges the
moments once, and hands each replica the global statistics on its own device.

Nothing waits forever: a waiting replica wakes when a peer raises, when a peer
finishes its forward without reaching this call, or at the deadline.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from .errors import (
    CheckpointRecomputeError,
    PeerFailedError,
    ReplicaMismatchError,
    SyncBatchNormError,
    SyncTimeoutError,
)
from .functional import merge_replica_moments, sync_batch_norm

DEFAULT_TIMEOUT = 300.0
"""Seconds a replica waits for its peers at one BatchNorm call before giving up."""


@dataclass
class _Contribution:
    layer: str
    channels: int
    count: int
    mean: Tensor
    var: Tensor


@dataclass
class _Slot:
    contributions: list
    results: Optional[list] = None
    error: Optional[Callable[[int], Exception]] = None
    collected: int = 0


@dataclass
class _ReplicaState:
    calls: int = 0
    started: bool = False
    done: bool = False
    error: Optional[BaseException] = None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


class ReplicaGroup:
    """Matches the k-th synchronized BatchNorm call of every replica of one forward."""

    def __init__(self, num_replicas: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.num_replicas = num_replicas
        self.timeout = timeout
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._replicas = [_ReplicaState() for _ in range(num_replicas)]

    # -- called by each replica's forward wrapper ---------------------------
    def replica_started(self, replica: int) -> None:
        self._replicas[replica].started = True

    def replica_finished(self, replica: int, error: Optional[BaseException] = None) -> None:
        """Mark a replica's forward as ended, so peers waiting for it wake up."""
        with self._cond:
            state = self._replicas[replica]
            state.done = True
            state.error = error
            self._cond.notify_all()

    @property
    def in_flight(self) -> bool:
        """True while some replica's forward has started and not every one has ended."""
        states = self._replicas
        return any(s.started for s in states) and not all(s.done for s in states)

    # -- called by each synchronized layer ----------------------------------
    def next_call(self, replica: int, layer: str) -> int:
        state = self._replicas[replica]
        if state.done:
            raise CheckpointRecomputeError(
                f"BatchNorm layer '{layer}' ran in replica {replica} after that replica's "
                f"forward had ended. This happens when torch.utils.checkpoint recomputes a "
                f"synchronized layer during backward: the replicas cannot meet again then. "
                f"Keep synchronized BatchNorm outside checkpointed segments, or exclude the "
                f"layer with autosyncbn.exclude()."
            )
        call = state.calls
        state.calls += 1
        return call

    def exchange(self, replica: int, call: int, contribution: _Contribution) -> tuple[Tensor, Tensor, int]:
        """Deposit this replica's moments for ``call``; return the merged statistics."""
        with self._cond:
            slot = self._slots.get(call)
            if slot is None:
                slot = self._slots[call] = _Slot([None] * self.num_replicas)
            slot.contributions[replica] = contribution
            if all(c is not None for c in slot.contributions):
                self._complete(call, slot)
                self._cond.notify_all()
            else:
                self._wait(replica, call, slot)
            slot.collected += 1
            if slot.collected == self.num_replicas:
                del self._slots[call]
            if slot.error is not None:
                raise slot.error(replica)
            return slot.results[replica]

    # -- internals -----------------------------------------------------------
    def _wait(self, replica: int, call: int, slot: _Slot) -> None:
        layer = slot.contributions[replica].layer
        deadline = time.monotonic() + self.timeout
        while slot.results is None and slot.error is None:
            self._raise_if_peer_cannot_come(replica, call, slot, layer)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [i for i, c in enumerate(slot.contributions) if c is None]
                made = {i: self._replicas[i].calls for i in missing}
                raise SyncTimeoutError(
                    f"replica {replica} waited {self.timeout:g}s at BatchNorm call {call} "
                    f"(layer '{layer}'), but replicas {missing} never reached that call "
                    f"(BatchNorm calls made so far: {made}). If a replica is legitimately "
                    f"slow, raise the timeout: install(timeout=...) or "
                    f"DataParallelWithCallback(..., timeout=...)."
                )
            self._cond.wait(remaining)

    def _raise_if_peer_cannot_come(self, replica: int, call: int, slot: _Slot, layer: str) -> None:
        for peer, state in enumerate(self._replicas):
            if peer == replica or slot.contributions[peer] is not None:
                continue
            if state.error is not None:
                raise PeerFailedError(
                    f"replica {replica} was waiting at BatchNorm call {call} (layer '{layer}'), "
                    f"but replica {peer} raised after {state.calls} BatchNorm call(s): "
                    f"{_describe(state.error)}"
                ) from state.error
            if state.done:
                raise ReplicaMismatchError(
                    f"replicas made different numbers of BatchNorm calls: replica {replica} "
                    f"reached call {call} (layer '{layer}'), but replica {peer} finished its "
                    f"forward after {state.calls} call(s). Every replica must run the same "
                    f"BatchNorm layers in the same order."
                )

    def _complete(self, call: int, slot: _Slot) -> None:
        contributions: list[_Contribution] = slot.contributions
        first = contributions[0]
        disagreeing = [
            (i, c) for i, c in enumerate(contributions)
            if c.layer != first.layer or c.channels != first.channels
        ]
        if disagreeing:
            detail = ", ".join(
                f"replica {i}: '{c.layer}' with {c.channels} channels"
                for i, c in enumerate(contributions)
            )
            message = (
                f"replicas disagree at BatchNorm call {call}: {detail}. Every replica must "
                f"run the same BatchNorm layers in the same order."
            )
            slot.error = lambda replica: ReplicaMismatchError(f"in replica {replica}: {message}")
            return
        total = sum(c.count for c in contributions)
        if total <= 1:
            size = [c.count for c in contributions]
            slot.error = lambda replica: ValueError(
                f"Expected more than 1 value per channel when training, got {total} value(s) "
                f"per channel over all replicas (per replica: {size}) at layer '{first.layer}'"
            )
            return
        try:
            merged = merge_replica_moments(
                [c.count for c in contributions],
                [c.mean for c in contributions],
                [c.var for c in contributions],
            )
            slot.results = [(mean, var, total) for mean, var in merged]
        except Exception as error:  # surfaced in every replica, never left waiting
            failure = error
            slot.error = lambda replica: SyncBatchNormError(
                f"in replica {replica}: merging statistics at BatchNorm call {call} "
                f"(layer '{first.layer}') failed: {_describe(failure)}"
            )


@dataclass
class ReplicaHandle:
    """What one BatchNorm layer in replica ``replica`` needs to synchronize."""

    group: ReplicaGroup
    replica: int
    layer: str

    @property
    def updates_running_stats(self) -> bool:
        # Replica 0's buffers are the base module's own tensors (DataParallel
        # broadcasts the source device's buffers as themselves).
        return self.replica == 0

    def batch_norm(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor, int]:
        call = self.group.next_call(self.replica, self.layer)
        channels = input.shape[1]

        def exchange(count: int, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, int]:
            contribution = _Contribution(self.layer, channels, count, mean, var)
            return self.group.exchange(self.replica, call, contribution)

        return sync_batch_norm(input, weight, bias, eps, exchange)
