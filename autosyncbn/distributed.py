"""The ``torch.distributed`` transport: moments and their gradients between ranks (no math).

Works on every backend PyTorch's collectives support: gloo on CPU (where
``torch.nn.SyncBatchNorm`` refuses to run) and NCCL on GPU. The merge and the
backward are ``functional.merge_over`` and ``functional._SynchronizedNormalization``;
this module only moves values and checks that ranks agree.

Every synchronized call starts with one all-gather of a fixed-size float64 record per rank:
a header (direction, call number, channel count, value count, layer
fingerprint, whether the call opens a forward) and up to 512 channels of two per-channel vectors, zero-padded.
Forward sends the rank's (mean, var); backward sends the rank's per-channel
sums (sum dy, sum dy * xhat), summed locally after the gather. Because every record has
the same size and says what it is, ranks that fall out of step (one skipped a
backward, ran another layer, or another number of calls) all raise the same
clear error instead of mixing statistics or aborting inside gloo. Layers
wider than 512 channels gather the rest in a second collective once the
headers agree. On disagreement the ranks gather each other's layer names in
one more fixed-size collective, so every message names layers in words.

A rank that raised inside a forward (between two BatchNorm layers) opens its
next forward at the model's first synchronized layer while its peers are
further into theirs: they raise, it meets their next forward, and every
rank's next step synchronizes (``_resolve_disagreement``). State per process
group lives with the group object (a weak key): a group destroyed and
initialized anew starts afresh.

Ranks get back in step after a disagreement. Every rank sees every header,
so all restart their call numbers at the same value (one past the largest
seen). A disagreement between forwards (or between backwards) makes every
rank raise at that call, and the next calls synchronize again. A rank that
makes no backward for a step while its peers do (it skipped it: "loss is NaN,
skip the step"; or it ran that step's training forward under
``torch.no_grad()``) goes on to its next step's forward, which meets its
peers' backward: every rank raises ``ReplicaMismatchError`` there, the
peers in that backward (that step's gradient would lack the skipping rank's
share), the skipping rank in its next step's forward. The peers are then one step
behind, so their next forward over the group raises ``ReplicaMismatchError``
too, at once and without a collective. So for a training loop that goes on
to its next batch after the error, the step after the skip fails on every
rank and the steps after it synchronize as before. No rank is left inside a
collective its peers do not enter: a ``dist.barrier()`` afterwards returns.
An extra training-mode forward on one rank only (one for logging, without
``eval()``) cannot be told from a skipped backward: its statistics mix with
the peers' next forward unnoticed and the ranks end up a step apart. Run
such passes in ``eval()`` mode.

A rank that stops calling BatchNorm leaves its peers waiting in a collective
until the process group's own timeout (``init_process_group(timeout=...)``).
In a child process made by ``fork`` (DataLoader workers), process groups
inherited from the parent are never used.
"""
from __future__ import annotations

import os
import threading
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ReplicaMismatchError
from .private_api import process_groups

HEADER = 6
"""direction, call number, channel count, value count, layer fingerprint, opens a forward (1/0)."""
_AGREE = (0, 1, 2, 4)
"""The header fields every rank must share (value counts differ with uneven slices)."""

FIRST_CHANNELS = 512
"""Channels whose vectors ride in the fixed-size first all-gather."""

NAME_BYTES = 256
"""Bytes of a layer's name exchanged when ranks disagree."""

FORWARD, BACKWARD = 1.0, 2.0
_DIRECTION = {FORWARD: "forward", BACKWARD: "backward"}

@dataclass
class _GroupState:
    """What this process keeps per process group; it goes with its group (a weak key)."""

    next_call: int = 0  # the call number of this process's next call
    # The peers' next call and why this process's next forward raises without a
    # collective (it is a step behind them), owed since the last disagreement.
    owed_drop: Optional[tuple[int, str]] = None
    opening_layer: Optional[int] = None  # fingerprint of the first synchronized forward call: where forwards start


_lock = threading.Lock()
_states: "weakref.WeakKeyDictionary[Any, _GroupState]" = weakref.WeakKeyDictionary()
_inherited_groups: list = []  # groups that existed when this process was forked from its parent


def _state(group: Any) -> _GroupState:
    """This process's state for ``group`` (call under ``_lock``): a group destroyed and made anew starts afresh."""
    state = _states.get(group)
    if state is None:
        state = _states[group] = _GroupState()
    return state


def _remember_inherited_groups() -> None:
    """In a forked child: every process group that exists now belongs to the parent."""
    global _lock
    _lock = threading.Lock()  # the parent's lock may have been held by another thread
    try:
        if dist.is_available() and dist.is_initialized():
            _inherited_groups.extend(process_groups(dist.distributed_c10d) or [dist.group.WORLD])
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


def _ranks(ranks: list) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(rank) for rank in ranks)


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
            self._state = state = _state(group)
            self.call = state.next_call
            state.next_call += 1
            if state.opening_layer is None:
                state.opening_layer = self.fingerprint
            self.opens = state.opening_layer == self.fingerprint
        self.channels = 0

    @classmethod
    def resume(cls, group: Any, layer: str, call: int, channels: int) -> "ProcessGroupTransport":
        """The transport of forward call number ``call``, for its backward (takes no new call number):
        for the compiled operators, whose backward cannot keep the forward's object."""
        transport = cls.__new__(cls)
        transport.group, transport.layer, transport.call = group, layer, call
        transport.fingerprint = _fingerprint(layer)
        transport.opens, transport.channels = False, channels
        with _lock:
            transport._state = _state(group)
        return transport

    # -- functional.MomentsTransport -------------------------------------------
    def gather(self, count: int, mean: Tensor, var: Tensor) -> tuple[list[int], Tensor]:
        self.channels = mean.shape[0]
        self._drop_if_behind()
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
        """One fixed-size all-gather; every rank checks every header, so all decide alike."""
        shown = min(self.channels, FIRST_CHANNELS)
        record = torch.zeros(HEADER + 2 * FIRST_CHANNELS, dtype=torch.float64, device=first.device)
        record[HEADER:HEADER + shown] = first[:shown]
        record[HEADER + FIRST_CHANNELS:HEADER + FIRST_CHANNELS + shown] = second[:shown]
        while True:
            record[:HEADER] = torch.tensor(
                [direction, self.call, self.channels, count, self.fingerprint, float(self.opens)],
                dtype=torch.float64)
            rows = _gather(record, self.group)
            headers = rows[:, :HEADER].tolist()
            if all([header[i] for i in _AGREE] == [headers[0][i] for i in _AGREE] for header in headers):
                return rows, headers
            self._resolve_disagreement(headers, first.device)  # raises, or this call meets its peers again

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

    def _drop_if_behind(self) -> None:
        """Owed since the last disagreement: this forward raises, no collective (peers dropped a step)."""
        with _lock:
            owed, self._state.owed_drop = self._state.owed_drop, None
            if owed is not None:
                # The peers' next call has the number every rank agreed on at the disagreement.
                self._state.next_call, reason = owed
        if owed is not None:
            raise ReplicaMismatchError(
                f"on rank {dist.get_rank(self.group)} (group rank) at layer '{self.layer}': this "
                f"forward did not synchronize: {reason}"
            )

    def _resolve_disagreement(self, headers: list, device: torch.device) -> None:
        """Every rank decides alike, from the same headers, how to get back in step.

        A rank whose call opens a forward (its model's first synchronized layer)
        while its peers are further into theirs raised in its previous forward
        between two layers (a caught out-of-memory error, say): the peers raise
        (their forward cannot complete) and this rank meets them again at the
        start of their next forward, so every rank's next step synchronizes and
        no step is lost twice. Any other disagreement: every rank raises.
        """
        names = self._gather_names(device)
        me = dist.get_rank(self.group)
        detail = "; ".join(
            f"rank {rank}: {_DIRECTION.get(header[0], '?')} of call {int(header[1])} "
            f"('{names[rank]}', {int(header[2])} channels)"
            for rank, header in enumerate(headers)
        )
        directions = [header[0] for header in headers]
        behind = [rank for rank, direction in enumerate(directions) if direction == BACKWARD]
        mixed = FORWARD in directions and bool(behind)
        ahead = [rank for rank in range(len(headers)) if rank not in behind]
        restarted = [rank for rank, header in enumerate(headers) if header[5]]
        midway = [rank for rank in range(len(headers)) if rank not in restarted]
        restart = (not behind and bool(restarted) and bool(midway)
                   and len({(headers[rank][2], headers[rank][4]) for rank in restarted}) == 1)
        with _lock:
            # Every rank computes the same number from the same headers: the next calls agree.
            realigned = int(max(header[1] for header in headers)) + 1
            state = self._state
            state.next_call = realigned + 1 if restart and me in restarted else realigned
            state.owed_drop = None
            if mixed and me in behind:
                state.owed_drop = realigned, (
                    f"at the previous synchronized call (layer '{self.layer}', call {self.call}) this "
                    f"rank ran a backward while {_ranks(ahead)} {'were' if len(ahead) > 1 else 'was'} "
                    f"already in a forward (no backward for {'their' if len(ahead) > 1 else 'its'} last "
                    f"step: skipped, or run under torch.no_grad()) and lost that step there. This rank "
                    f"drops this one, so that every rank's next step synchronizes again."
                )
        if restart and me in restarted:
            self.call = realigned  # meet the peers' next forward at its first call
            return
        if restart:
            cause = (f"{_ranks(restarted)} began a new forward while this rank was in the middle of "
                     f"one: {'they' if len(restarted) > 1 else 'it'} raised in the previous forward "
                     f"(between two BatchNorm layers) and left it. This forward cannot complete; "
                     f"{_ranks(restarted)} wait{'' if len(restarted) > 1 else 's'} for this rank's next "
                     f"forward, which synchronizes again.")
        elif mixed:
            cause = (
                "A rank skipped a backward (or ran one more, or ran a training forward under "
                "torch.no_grad()): every rank must run backward through the same synchronized "
                f"calls, or none. Ranks realign: {_ranks(behind)}, one step behind, "
                f"raise{'' if len(behind) > 1 else 's'} this error again at {'their' if len(behind) > 1 else 'its'} "
                f"next forward without synchronizing; the steps after that synchronize again."
            )
        else:
            cause = ("Every rank must run the same synchronized BatchNorm calls in the same order. "
                     "Every rank raised here; the next calls synchronize again.")
        raise ReplicaMismatchError(
            f"on rank {me} (group rank) at layer '{self.layer}': ranks disagree: {detail}. {cause}"
        )

    def _gather_names(self, device: torch.device) -> list[str]:
        encoded = self.layer.encode()[:NAME_BYTES]
        record = torch.zeros(NAME_BYTES, dtype=torch.uint8, device=device)
        record[:len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        rows = _gather(record, self.group).cpu()
        return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in rows]
