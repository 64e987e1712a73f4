"""The meeting point of the N replica threads of one DataParallel forward.

``replicas.py`` makes one :class:`ReplicaGroup` per forward, at ``replicate``.
The i-th synchronized call of every replica meets in slot i; the last
replica to arrive checks that all agree (same layer, same channel count),
merges for all and makes the call's autograd node (``functional.merge_parts``;
the math lives there), and every replica takes its share. Each waiting
replica waits on a plain lock of its own, so it makes no Python call while it
waits.

Nothing waits forever: a waiting replica wakes when a peer raises, when a
peer finishes its forward without reaching this call, when a peer has not
even started its forward after a while (replicas run one after another
instead of side by side), or at the deadline.
"""
from __future__ import annotations

import functools
import threading
import time
from _thread import allocate_lock as _allocate_lock
from typing import Any, Callable, Iterable, NamedTuple, Optional

from torch import Tensor

from .errors import PeerFailedError, ReplicaMismatchError, SyncBatchNormError, SyncTimeoutError
from .functional import LayerCall, merge_parts
from .private_api import ExceptionWrapper

POLL_SECONDS = 0.25
"""How often a waiting replica looks at the clock and its peers (a peer's failure wakes it at once)."""

START_GRACE_SECONDS = 10.0
"""How long a replica waits for a peer whose forward has not started before calling it a sequential run."""

class Contribution(NamedTuple):
    """What one replica brings to one synchronized call (see :func:`contribution`)."""

    layer: int  # its index in the replica's module tree
    channels: int
    count: int  # type: ignore[assignment]  # values per channel in this slice (shadows tuple.count)
    moments: "tuple[Tensor, Tensor]"  # (mean, biased var) of this slice
    input: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    packed: Any  # functional.pack_part's result in the replica's thread, or None (no saved-tensor hooks)


contribution = functools.partial(tuple.__new__, Contribution)
"""``contribution((layer, channels, ...))``: a :class:`Contribution` made in C, no Python frame
(NamedTuple's own ``__new__`` is Python, and this runs for every replica's every call)."""


class ReplicaFailure(NamedTuple):
    """A replica's error as text (PyTorch's ``ExceptionWrapper``): the group holds no live
    exception, whose traceback would reach the replica's frames and keep its activations alive."""

    description: str
    wrapper: ExceptionWrapper

    def rebuilt(self) -> BaseException:
        """A new exception of the replica's type, its message the original traceback (as DataParallel does)."""
        wrapper = self.wrapper
        message = f"Caught {wrapper.exc_type.__name__} {wrapper.where}.\nOriginal {wrapper.exc_msg}"
        try:
            return wrapper.exc_type(message)
        except Exception:
            return RuntimeError(message)


_columns: Callable[[Iterable[Any]], Any] = contribution
"""Every replica's contributions to one call, transposed: ``.layer`` is every replica's layer, and so on."""


class _Slot:
    __slots__ = ("arrived", "contributions", "created", "error", "opened", "results", "waiting")

    contributions: list[Optional[Contribution]]  # per replica, None until it arrives
    arrived: int
    waiting: list[Any]  # the waiting replicas' locks
    opened: bool
    results: Optional[tuple[LayerCall, tuple[Tensor, ...]]]
    error: Optional[Callable[[int], BaseException]]  # the error for a given replica, once the call failed
    created: float


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


class ReplicaGroup:
    """Matches the i-th synchronized batch-statistics call of every replica of one forward.

    Args:
        num_replicas: how many replicas meet.
        timeout: seconds a replica waits for its peers at one call.
        plan: what this forward synchronizes (``replicas.ReplicaPlan``), fixed at replicate.
        layer_names: gives every layer index's qualified name (for messages and the exclude filter).
    """

    def __init__(self, num_replicas: int, timeout: float, plan: Any, layer_names: Callable[[], list]) -> None:
        self.num_replicas = num_replicas
        self.timeout = timeout
        self.plan = plan
        self.routes: dict = {}  # layer index -> route, decided by the first replica that calls it
        self.autocast: list = []  # the caller's autocast (device, dtype) pairs
        # Per replica, indexed by replica number (nothing here refers back to a module or the
        # group, so a forward leaves no reference cycle):
        self.calls = [0] * num_replicas  # synchronized calls so far (each counted by its own replica)
        self.depth = [0] * num_replicas  # calls of the replica's root in progress (a forward may call it again)
        self.started = [False] * num_replicas
        self.done = [False] * num_replicas
        self.errors: list[Optional[ReplicaFailure]] = [None] * num_replicas
        self.outer: list = [None] * num_replicas  # what the thread ran before this replica started
        self.outer_errors: list[Optional[BaseException]] = [None] * num_replicas
        self.entered: list[list] = [[] for _ in range(num_replicas)]  # autocast contexts entered by its start
        self.seen: set = set()  # ids of replica 0's running_mean buffers whose calls reached autosyncbn
        # Synchronized calls made under saved-tensor hooks (activation checkpointing), per
        # (replica, layer): [(slice (mean, var), LayerCall)], replayed when the call is recomputed.
        self.recorded: dict = {}
        self.watched: list = []  # replica 0's layers to check at its end (see replicas.py)
        self._layer_names = layer_names
        self._names: Optional[list] = None
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._unfinished = num_replicas
        self.on_finished: Callable[[], None] = lambda: None

    def layer_name(self, index: int) -> str:
        """The qualified name of layer ``index`` (computed once, on first need)."""
        if index < 0:
            return "<BatchNorm call outside the replicated module>"
        if self._names is None:
            self._names = self._layer_names()
        return self._names[index] if index < len(self._names) else f"<layer {index}>"

    # -- the start and end of each replica's forward, reported by its hooks -----
    def replica_finished(self, replica: int, error: Optional[BaseException] = None) -> None:
        """Mark a replica's forward as ended; peers waiting for a call it never made wake at once.

        Called in the replica's thread while ``error`` is being handled (an always-called hook).
        """
        failure = None if error is None else ReplicaFailure(_describe(error), ExceptionWrapper(
            (type(error), error, error.__traceback__), where=f"in replica {replica}"))
        with self._lock:
            if self.done[replica]:
                return
            self.done[replica], self.errors[replica] = True, failure
            opened = [slot for slot in self._slots.values() if slot.contributions[replica] is None]
            self._unfinished -= 1
            last = self._unfinished == 0
        for slot in opened:
            self._open(slot)
        if last and not self.recorded:  # a recorded forward may still be recomputed: held until it is gone
            self.on_finished()

    def root_failure(self) -> Optional[ReplicaFailure]:
        """The first replica error that is not about synchronization itself (the real cause)."""
        for failure in self.errors:
            if failure is not None and not issubclass(failure.wrapper.exc_type, SyncBatchNormError):
                return failure
        return None

    # -- one synchronized call -------------------------------------------------------
    def meet(self, replica: int, call: int, contribution: Contribution) -> "tuple[LayerCall, tuple[Tensor, ...]]":
        """Deposit replica ``replica``'s call number ``call``; return the merged call and every output."""
        wake = None
        with self._lock:
            slot = self._slots.get(call)
            if slot is None:
                slot = self._slots[call] = self._new_slot()
            slot.contributions[replica] = contribution
            slot.arrived += 1
            last = slot.arrived == self.num_replicas
            if last:
                del self._slots[call]
            elif not slot.opened:  # wait on a lock of our own, released once the slot opens
                wake = _allocate_lock()
                wake.acquire()
                slot.waiting.append(wake)
        if last:
            try:
                self._complete(call, slot)
            except BaseException as error:  # the peers must hear of it, not wait for their deadline
                merger, failure = replica, _describe(error)
                slot.error = lambda peer: PeerFailedError(
                    f"replica {peer} was waiting at BatchNorm call {call}, but replica {merger} failed while "
                    f"merging it: {failure}")
                raise
            finally:
                self._open(slot)
        else:
            since = time.monotonic()
            if wake is not None and self._unfinished < self.num_replicas:
                self._raise_if_stuck(replica, call, slot, since)  # a peer ended before this call was made
            while wake is not None and not wake.acquire(True, POLL_SECONDS):
                self._raise_if_stuck(replica, call, slot, since)
            if slot.results is None and slot.error is None:  # opened because a peer ended: it never comes
                self._raise_if_stuck(replica, call, slot, since)
        if slot.error is not None:
            raise slot.error(replica)
        return slot.results  # type: ignore[return-value]

    def _open(self, slot: _Slot) -> None:
        """Wake every replica waiting at ``slot``, each at once (no hand-over from one to the next)."""
        with self._lock:
            slot.opened = True
            waiting, slot.waiting = slot.waiting, []
        for wake in waiting:
            wake.release()

    def _new_slot(self) -> _Slot:
        slot = _Slot()
        slot.contributions = [None] * self.num_replicas
        slot.arrived = 0
        slot.waiting = []
        slot.opened = False
        slot.results = slot.error = None
        slot.created = time.monotonic()
        return slot

    def _complete(self, call: int, slot: _Slot) -> None:
        """The last replica to arrive: check that all agree, then merge for all."""
        parts = _columns(zip(*slot.contributions))
        layers, channels = parts.layer, parts.channels
        if len(set(layers)) > 1 or len(set(channels)) > 1:
            detail = ", ".join(f"replica {i}: '{self.layer_name(layer)}' with {width} channels"
                               for i, (layer, width) in enumerate(zip(layers, channels)))
            message = (f"replicas disagree at BatchNorm call {call}: {detail}. Every replica must "
                       f"run the same BatchNorm layers in the same order.")
            slot.error = lambda replica: ReplicaMismatchError(f"in replica {replica}: {message}")
            return
        try:
            slot.results = merge_parts(parts.count, parts.moments, parts.eps[0], parts.input, parts.weight,
                                       parts.bias, parts.packed)
        except Exception as error:  # surfaced in every replica, never left waiting
            detail = (f"merging statistics at BatchNorm call {call} (layer '{self.layer_name(layers[0])}') "
                      f"failed: {_describe(error)}")
            slot.error = lambda replica: SyncBatchNormError(f"in replica {replica}: {detail}")

    def _raise_if_stuck(self, replica: int, call: int, slot: _Slot, since: float) -> None:
        """Raise when the call cannot complete: a peer failed, finished, never started, or this
        replica's deadline (``timeout`` after it arrived, at ``since``) passed."""
        own = slot.contributions[replica]
        assert own is not None  # deposited by meet before this replica waits
        layer = self.layer_name(own[0])
        waited = time.monotonic() - since
        missing = [i for i, c in enumerate(slot.contributions) if c is None]
        for peer in missing:
            failure = self.errors[peer]
            if failure is not None:
                # The peer's error is described, not chained: a runner that re-raises it
                # while handling this one must not make a cycle of __cause__/__context__.
                raise PeerFailedError(
                    f"replica {replica} was waiting at BatchNorm call {call} (layer '{layer}'), but "
                    f"replica {peer} raised after {self.calls[peer]} BatchNorm call(s): {failure.description}")
            if self.done[peer]:
                raise ReplicaMismatchError(
                    f"replicas made different numbers of BatchNorm calls: replica {replica} reached "
                    f"call {call} (layer '{layer}'), but replica {peer} finished its forward after "
                    f"{self.calls[peer]} call(s). Every replica must run the same BatchNorm layers in the same order.")
        not_started = [i for i in missing if not self.started[i]]
        open_for = time.monotonic() - slot.created
        if not_started and open_for > min(self.timeout, START_GRACE_SECONDS):
            raise SyncBatchNormError(
                f"BatchNorm call {call} (layer '{layer}') has waited {open_for:.0f}s in replica {replica}, but "
                f"replicas {not_started} never started their forward: synchronized replicas must run side "
                f"by side, one thread each (as torch.nn.parallel.parallel_apply runs them), not one after another, "
                f"and be called as modules (replica(x), not replica.forward(x), which skips the hooks that "
                f"report a replica's start, end and errors).")
        if waited >= self.timeout:
            made = {i: self.calls[i] for i in missing}
            raise SyncTimeoutError(
                f"replica {replica} waited {self.timeout:g}s at BatchNorm call {call} (layer '{layer}'), "
                f"but replicas {missing} never reached that call (BatchNorm calls made so far: {made}). "
                f"If a replica is legitimately slow, raise the timeout: install(timeout=...) or "
                f"DataParallelWithCallback(..., timeout=...).")
