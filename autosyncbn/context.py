"""What a replica's thread knows while it runs its part of one DataParallel forward.

``replicas.py`` makes one :class:`ReplicaContext` per replica when the
forward starts and enters it in the replica's thread around the whole call
(pre-hooks, forward, hooks, re-entrant calls). ``dispatch.py`` reads it at
every batch-statistics call: a thread inside a context belongs to a replica,
and the plan it carries was decided once, before any replica ran.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from torch import nn

from .group import ReplicaGroup
from .settings import LayerFilter

EXCLUDED_ATTRIBUTE = "_autosyncbn_excluded"
"""Instance attribute marking a module whose BatchNorm calls stay per slice (``autosyncbn.exclude``)."""

FORWARD_ATTRIBUTE = "_autosyncbn_forward"
"""Instance attribute on a replica's module that synchronized: the context it synchronized in."""


@dataclass(frozen=True)
class ReplicaPlan:
    """What one DataParallel forward synchronizes, fixed before its replicas run.

    ``include_plain``: every batch-statistics computation (``install()``), or
    only the calls of autosyncbn's own layers (the explicit API).
    """

    timeout: float
    include_plain: bool
    exclude: Optional[LayerFilter] = None


@dataclass
class ReplicaContext:
    """Replica ``index`` of one forward: its group, its module tree and what it decided."""

    group: ReplicaGroup
    index: int
    root: nn.Module
    plan: ReplicaPlan
    synchronized: set = field(default_factory=set)  # ids of modules that synchronized here
    _names: Optional[dict] = None
    _excluded: dict = field(default_factory=dict)

    def name_of(self, owner: Optional[nn.Module]) -> str:
        """The owner's qualified name inside the replicated module (built on first need)."""
        if owner is None:
            return "<F.batch_norm outside any module>"
        if self._names is None:
            self._names = {id(module): name or "<root>" for name, module in self.root.named_modules()}
        name = self._names.get(id(owner))
        return name if name is not None else f"<{type(owner).__name__} outside the replicated module>"

    def excludes(self, owner: Optional[nn.Module]) -> bool:
        """Whether ``owner`` stays per slice: marked with ``exclude()`` or matched by the plan's filter."""
        if owner is None:
            return False
        key = id(owner)
        found = self._excluded.get(key)
        if found is None:
            found = bool(owner.__dict__.get(EXCLUDED_ATTRIBUTE, False)) or bool(
                self.plan.exclude is not None and self.plan.exclude(self.name_of(owner), owner)
            )
            self._excluded[key] = found
        return found

    def mark_synchronized(self, owner: Optional[nn.Module]) -> None:
        """Remember that ``owner`` synchronized here; a replica's own copy also learns its forward."""
        if owner is not None:
            self.synchronized.add(id(owner))
            # Only replica copies (made for this forward) are marked: a module shared
            # with the base model must not carry this forward past its end.
            if owner.__dict__.get("_is_replica", False):
                owner.__dict__[FORWARD_ATTRIBUTE] = self


_local = threading.local()


def current() -> Optional[ReplicaContext]:
    """The replica context of this thread, or None outside every replica."""
    return getattr(_local, "context", None)


@contextmanager
def entered(context: ReplicaContext) -> Iterator[None]:
    """Run the block as replica ``context.index`` (nests: an inner DataParallel has its own)."""
    outer = getattr(_local, "context", None)
    _local.context = context
    try:
        yield
    finally:
        _local.context = outer


def finished_forward_of(owner: Any) -> Optional[ReplicaContext]:
    """The context a replica module synchronized in, when that forward has ended."""
    context = getattr(owner, "__dict__", {}).get(FORWARD_ATTRIBUTE)
    if context is not None and context.group.replica_done(context.index):
        return context
    return None
