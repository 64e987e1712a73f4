"""The meeting point of the N replica threads of one DataParallel forward (transport only).

``replicas.py`` makes one ``ReplicaGroup`` per forward. The i-th synchronized
call of every replica meets in slot i; the last replica to arrive checks that
all agree (same layer, same channel count), merges the moments once (the
math is ``functional.merge_parts``), and hands each replica its share of the
merged statistics on its own device.

Nothing waits forever: a waiting replica wakes when a peer raises, when a peer
finishes its forward without reaching this call, or at the deadline.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from .errors import PeerFailedError, ReplicaMismatchError, SyncBatchNormError, SyncTimeoutError
from .functional import Exchange, Share, merge_parts


@dataclass
class _Contribution:
    layer: str
    channels: int
    count: int
    moments: "tuple[Tensor, Tensor]"
    input: Tensor
    weight: Optional[Tensor]
    eps: float


@dataclass
class _Slot:
    contributions: list
    results: Optional[list] = None
    error: Optional[Callable[[int], Exception]] = None
    collected: int = 0


@dataclass
class _ReplicaState:
    calls: int = 0
    done: bool = False
    error: Optional[BaseException] = None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


class ReplicaGroup:
    """Matches the i-th synchronized batch-statistics call of every replica of one forward."""

    def __init__(self, num_replicas: int, timeout: float) -> None:
        self.num_replicas = num_replicas
        self.timeout = timeout
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._replicas = [_ReplicaState() for _ in range(num_replicas)]

    # -- the end of each replica's call, reported by its call wrapper ----------
    def replica_finished(self, replica: int, error: Optional[BaseException] = None) -> None:
        """Mark a replica's call as ended, so peers waiting for it wake up at once."""
        with self._cond:
            state = self._replicas[replica]
            state.done = True
            state.error = error
            self._cond.notify_all()

    def replica_done(self, replica: int) -> bool:
        with self._cond:
            return self._replicas[replica].done

    def root_failure(self) -> Optional[tuple[int, BaseException]]:
        """The first replica error that is not about synchronization itself (the real cause)."""
        with self._cond:
            for index, state in enumerate(self._replicas):
                if state.error is not None and not isinstance(state.error, SyncBatchNormError):
                    return index, state.error
        return None

    # -- called by each synchronized call ----------------------------------------
    def exchange_for(self, replica: int, layer: str, channels: int) -> Exchange:
        """The exchange of replica ``replica``'s next synchronized call (numbered from 0)."""
        # Only replica ``replica``'s own thread counts its calls (peers just read the count).
        state = self._replicas[replica]
        call = state.calls
        state.calls += 1

        def exchange(input: Tensor, weight: Optional[Tensor], count: int, moments: "tuple[Tensor, Tensor]",
                     eps: float) -> Share:
            return self._meet(replica, call, _Contribution(layer, channels, count, moments, input, weight, eps))

        return exchange

    def _meet(self, replica: int, call: int, contribution: _Contribution) -> Share:
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
            return slot.results[replica]  # type: ignore[index]

    # -- internals -------------------------------------------------------------
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
            # Short waits: a peer's failure always notifies, this only bounds the clock.
            self._cond.wait(min(remaining, 1.0))

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
        if any(c.layer != first.layer or c.channels != first.channels for c in contributions):
            detail = ", ".join(
                f"replica {i}: '{c.layer}' with {c.channels} channels" for i, c in enumerate(contributions)
            )
            message = (
                f"replicas disagree at BatchNorm call {call}: {detail}. Every replica must "
                f"run the same BatchNorm layers in the same order."
            )
            slot.error = lambda replica: ReplicaMismatchError(f"in replica {replica}: {message}")
            return
        try:
            slot.results = list(merge_parts([c.count for c in contributions], [c.moments for c in contributions],
                                            [c.input for c in contributions], [c.weight for c in contributions],
                                            first.eps))
        except Exception as error:  # surfaced in every replica, never left waiting
            failure = error
            slot.error = lambda replica: SyncBatchNormError(
                f"in replica {replica}: merging statistics at BatchNorm call {call} "
                f"(layer '{first.layer}') failed: {_describe(failure)}"
            )
