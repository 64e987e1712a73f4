"""See what happened: which batch-statistics calls synchronized, which stayed per slice, and why.

Also the one place that warns about a layer left per slice against the user's wish
(``UnsynchronizedBatchNormWarning``, once per layer and installation).

``with autosyncbn.sync_report() as report:`` records every BatchNorm call
that autosyncbn sees in the block (from every thread), and
``print(report)`` shows one row per layer and outcome.
"""
from __future__ import annotations

import threading
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from .errors import UnsynchronizedBatchNormWarning


@dataclass(frozen=True)
class SyncRecord:
    """One outcome of one layer's call."""

    layer: str
    synchronized: bool
    reason: str
    replica: Optional[int] = None


class SyncReport:
    """What autosyncbn did with each BatchNorm call made while the report was open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[SyncRecord] = []

    def add(self, record: SyncRecord) -> None:
        with self._lock:
            self.records.append(record)

    def rows(self) -> list[tuple[str, bool, str, int]]:
        """(layer, synchronized, reason, calls), in the order layers were first seen."""
        with self._lock:
            counts = Counter((r.layer, r.synchronized, r.reason) for r in self.records)
        return [(layer, synced, reason, calls) for (layer, synced, reason), calls in counts.items()]

    @property
    def synchronized(self) -> list[str]:
        """Layers with at least one synchronized call."""
        return list(dict.fromkeys(layer for layer, synced, _, _ in self.rows() if synced))

    @property
    def per_slice(self) -> dict[str, list[str]]:
        """Layers with a call that stayed per slice, and every reason seen."""
        reasons: dict[str, list[str]] = {}
        for layer, synced, reason, _ in self.rows():
            if not synced:
                reasons.setdefault(layer, []).append(reason)
        return reasons

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return "no BatchNorm call was seen"
        width = max(len(layer) for layer, *_ in rows)
        lines = [f"{'layer':<{width}}  {'calls':>5}  outcome"]
        for layer, synced, reason, calls in rows:
            lines.append(f"{layer:<{width}}  {calls:>5}  {'synchronized' if synced else 'not synchronized'}: {reason}")
        return "\n".join(lines)


OPEN: list[SyncReport] = []
"""The reports open now (read without a lock: a list is replaced, never changed in place)."""
_lock = threading.Lock()


def recording() -> bool:
    return bool(OPEN)


def record(layer: str, synchronized: bool, reason: str, replica: Optional[int] = None) -> None:
    entry = SyncRecord(layer, synchronized, reason, replica)
    for report in OPEN:
        report.add(entry)


@contextmanager
def sync_report() -> Iterator[SyncReport]:
    """Record what autosyncbn does with each BatchNorm call in the block.

    Examples::

        >>> with autosyncbn.sync_report() as report:
        ...     loss = criterion(parallel_model(x), y)
        >>> print(report)           # one row per layer: synchronized, or per slice and why
        >>> report.per_slice        # {'head.bn': ['excluded'], ...}
    """
    global OPEN
    report = SyncReport()
    with _lock:
        OPEN = [*OPEN, report]
    try:
        yield report
    finally:
        with _lock:
            OPEN = [r for r in OPEN if r is not report]


# -- warnings: what stays per slice although it should synchronize -------------------
_warned: set[str] = set()
_warned_lock = threading.Lock()


def forget_warnings() -> None:
    """Each installation warns once per layer (patching calls this when it first applies)."""
    with _warned_lock:
        _warned.clear()


def left_per_slice(key: str, layer: str, message: str, reason: str) -> None:
    """Replica 0's ``layer`` normalized per slice where it could not synchronize: warn once
    (``key``: the layer and the cause) and record it in every open report."""
    warn_once(key, message)
    if OPEN:
        record(layer, False, reason, 0)


def warn_once(key: str, message: str) -> None:
    """One ``UnsynchronizedBatchNormWarning`` per layer and cause (replicas are new objects every
    forward: keyed by name)."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, UnsynchronizedBatchNormWarning, stacklevel=4)
