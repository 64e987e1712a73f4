"""See what happened: which batch-statistics calls synchronized, which stayed per slice, and why.

``with autosyncbn.sync_report() as report:`` records every BatchNorm call
that autosyncbn sees in the block (from every thread), and
``print(report)`` shows one row per layer and outcome.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional


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


_open_reports: list[SyncReport] = []
_lock = threading.Lock()


def recording() -> bool:
    return bool(_open_reports)


def record(layer: str, synchronized: bool, reason: str, replica: Optional[int] = None) -> None:
    entry = SyncRecord(layer, synchronized, reason, replica)
    for report in list(_open_reports):
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
    report = SyncReport()
    with _lock:
        _open_reports.append(report)
    try:
        yield report
    finally:
        with _lock:
            _open_reports.remove(report)
