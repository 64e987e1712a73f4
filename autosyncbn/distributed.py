"""The ``torch.distributed`` transport: moments and their gradients between ranks (no math).

Works on every backend PyTorch's collectives support: gloo on CPU (where
``torch.nn.SyncBatchNorm`` refuses to run) and NCCL on GPU. The merge and the
gradient are ``functional.merge_over`` and ``functional._MergeStatistics``;
this module only moves values and checks that ranks agree.

Every synchronized call starts with one all-gather of a fixed-size float64 record per rank:
a header (direction, call number, channel count, value count, layer
fingerprint) and up to 512 channels of two per-channel vectors, zero-padded.
Forward sends the rank's (mean, var); backward sends the gradients of the
merged (mean, var), summed locally after the gather. Because every record has
the same size and says what it is, ranks that fall out of step (one skipped a
backward, ran another layer, or another number of calls) all raise the same
clear error instead of mixing statistics or aborting inside gloo. Layers
wider than 512 channels gather the rest in a second collective once the
headers agree. On disagreement the ranks gather each other's layer names in
one more fixed-size collective, so every message names layers in words.

A rank that stops calling BatchNorm leaves its peers waiting in a collective
until the process group's own timeout (``init_process_group(timeout=...)``).
In a child process made by ``fork`` (DataLoader workers), process groups
inherited from the parent are never used.
"""
from __future__ import annotations

import itertools
import os
import threading
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ReplicaMismatchError

HEADER = 5
"""direction, call number, channel count, value count, layer fingerprint."""

FIRST_CHANNELS = 512
"""Channels whose vectors ride in the fixed-size first all-gather."""

NAME_BYTES = 256
"""Bytes of a layer's name exchanged when ranks disagree."""

FORWARD, BACKWARD = 1.0, 2.0
_DIRECTION = {FORWARD: "forward", BACKWARD: "backward"}

_lock = threading.Lock()
_call_counters: dict[int, itertools.count] = {}
_inherited_groups: list = []  # groups that existed when this process was forked from its parent


def _remember_inherited_groups() -> None:
    """In a forked child: every process group that exists now belongs to the parent."""
    global _lock
    _lock = threading.Lock()  # the parent's lock may have been held by another thread
    try:
        if dist.is_available() and dist.is_initialized():
            world = getattr(dist.distributed_c10d, "_world", None)
            groups = list(getattr(world, "pg_map", {}) or {}) if world is not None else []
            _inherited_groups.extend(groups or [dist.group.WORLD])
    except Exception:  # never break a fork over this; treat the world as inherited
        _inherited_groups.append(dist.group.WORLD)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_remember_inherited_groups)


def usable_group(process_group: Any = None) -> Any:
    """The group to synchronize over, or None: not initialized, inherited by fork, or fewer than 2 ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if _inherited_groups and any(group is inherited for inherited in _inherited_groups):
        return None
    if dist.get_world_size(group) < 2:
        return None
    return group


def _fingerprint(name: str) -> int:
    return zlib.crc32(name.encode())


def _gather(tensor: Tensor, group: Any) -> Tensor:
    world = dist.get_world_size(group)
    out = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    # all_gather_single is the newer name (PyTorch 2.10+) of all_gather_into_tensor.
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_into(out, tensor, group=group)
    return out.view(world, -1)


class ProcessGroupTransport:
    """One synchronized call's traffic over a process group: forward moments, backward gradients.

    Args:
        group: the process group (2+ ranks).
        layer: the layer's qualified name, for errors on every rank.
    """

    def __init__(self, group: Any, layer: str) -> None:
        self.group = group
        self.layer = layer
        self.fingerprint = _fingerprint(layer)
        with _lock:
            counter = _call_counters.setdefault(id(group), itertools.count())
            self.call = next(counter)
        self.channels = 0

    # -- functional.MomentsTransport -------------------------------------------
    def gather(self, count: int, mean: Tensor, var: Tensor) -> tuple[list[int], Tensor]:
        self.channels = mean.shape[0]
        rows, headers = self._exchange(FORWARD, count, mean, var)
        counts = [int(header[3]) for header in headers]
        means, variances = self._vectors(rows, mean, var)
        return counts, torch.stack([means, variances], 1)

    def sum_gradients(self, grad: Tensor) -> Tensor:
        rows, _ = self._exchange(BACKWARD, 0, grad[0], grad[1])
        grad_means, grad_vars = self._vectors(rows, grad[0], grad[1])
        return torch.stack([grad_means.sum(0), grad_vars.sum(0)])

    # -- internals -------------------------------------------------------------
    def _exchange(self, direction: float, count: int, first: Tensor, second: Tensor) -> tuple[Tensor, list]:
        """One fixed-size all-gather; every rank checks every header, so all raise alike."""
        shown = min(self.channels, FIRST_CHANNELS)
        record = torch.zeros(HEADER + 2 * FIRST_CHANNELS, dtype=torch.float64, device=first.device)
        record[:HEADER] = torch.tensor(
            [direction, self.call, self.channels, count, self.fingerprint], dtype=torch.float64
        )
        record[HEADER:HEADER + shown] = first[:shown]
        record[HEADER + FIRST_CHANNELS:HEADER + FIRST_CHANNELS + shown] = second[:shown]
        rows = _gather(record, self.group)
        headers = rows[:, :HEADER].tolist()
        if any(header[:3] + header[4:] != headers[0][:3] + headers[0][4:] for header in headers):
            self._raise_disagreement(headers, first.device)
        return rows, headers

    def _vectors(self, rows: Tensor, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Every rank's two vectors (one row per rank), the channels past 512 gathered now."""
        shown = min(self.channels, FIRST_CHANNELS)
        firsts = rows[:, HEADER:HEADER + shown]
        seconds = rows[:, HEADER + FIRST_CHANNELS:HEADER + FIRST_CHANNELS + shown]
        if self.channels > shown:  # the headers agree, so every rank sends the same size
            rest = _gather(torch.cat([first[shown:], second[shown:]]).to(torch.float64), self.group)
            firsts = torch.cat([firsts, rest[:, :self.channels - shown]], dim=1)
            seconds = torch.cat([seconds, rest[:, self.channels - shown:]], dim=1)
        return firsts, seconds

    def _raise_disagreement(self, headers: list, device: torch.device) -> None:
        names = self._gather_names(device)
        me = dist.get_rank(self.group)
        detail = "; ".join(
            f"rank {rank}: {_DIRECTION.get(direction, '?')} of call {int(call)} "
            f"('{names[rank]}', {int(channels)} channels)"
            for rank, (direction, call, channels, _, _) in enumerate(headers)
        )
        directions = {direction for direction, *_ in headers}
        cause = (
            "A rank skipped a backward (or ran one more): every rank must run backward "
            "through the same synchronized calls, or none." if len(directions) > 1 else
            "Every rank must run the same synchronized BatchNorm calls in the same order."
        )
        raise ReplicaMismatchError(
            f"on rank {me} (group rank) at layer '{self.layer}': ranks disagree: {detail}. {cause}"
        )

    def _gather_names(self, device: torch.device) -> list[str]:
        encoded = self.layer.encode()[:NAME_BYTES]
        record = torch.zeros(NAME_BYTES, dtype=torch.uint8, device=device)
        record[:len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        rows = _gather(record, self.group).cpu()
        return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in rows]
