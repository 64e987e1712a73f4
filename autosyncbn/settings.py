"""What ``install()`` and ``patched()`` asked for, as seen from each thread.

Patching is process-wide, as PyTorch's functions are: while ``install()``
holds or any ``patched()`` scope is open, DataParallel forwards in every
thread synchronize. Options: ``install()`` holds one set; each scope holds its
own, owned by the thread that entered it. A thread sees, in this order: the
innermost scope it entered itself, else the options of ``install()``, else
those of the most recent scope entered by any thread. The patches stay applied while ``install()`` holds, any scope is
open, or any DataParallel forward registered at ``replicate`` still runs:
each such forward holds the patches (``hold_patches``), so ``uninstall()``
never waits and never takes them away from a forward in flight. A forward is
synchronized wholly or not at all.
"""
from __future__ import annotations

import itertools
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from torch import nn

DEFAULT_TIMEOUT = 300.0
"""Seconds a replica waits for its peers at one BatchNorm call before giving up."""

LayerFilter = Callable[[str, nn.Module], bool]
"""``(qualified name, layer) -> True`` to leave that layer unsynchronized."""


def checked_timeout(timeout: Any) -> float:
    """A positive, finite number of seconds, or a ``TypeError``/``ValueError`` where it is given."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__} {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(
            f"timeout must be a positive, finite number of seconds, got {timeout!r}: every wait "
            f"for a peer has a deadline, so that nothing hangs"
        )
    return float(timeout)


def checked_exclude(exclude: Any) -> Optional[LayerFilter]:
    if exclude is not None and not callable(exclude):
        raise TypeError(
            f"exclude must be a callable (qualified_name, layer) -> bool, got {type(exclude).__name__}; "
            f"to leave given modules per slice, use autosyncbn.exclude(module)"
        )
    return exclude


@dataclass(frozen=True)
class Options:
    """One set of ``install()``/``patched()`` options, checked when given."""

    timeout: float = DEFAULT_TIMEOUT
    exclude: Optional[LayerFilter] = None
    distributed: bool = False
    process_group: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "timeout", checked_timeout(self.timeout))
        checked_exclude(self.exclude)
        if not isinstance(self.distributed, bool):
            raise TypeError(f"distributed must be True or False, got {self.distributed!r}")
        if self.process_group is not None and not self.distributed:
            raise ValueError("process_group is used only with distributed=True; pass both, or neither")


_lock = threading.RLock()
_installed: Optional[Options] = None
_scopes: dict[int, tuple[int, Options]] = {}  # token -> (thread id, options), in entry order
_tokens = itertools.count()
# Read without the lock (by every BatchNorm call, and by torch.compile's tracer):
# rebuilt under the lock whenever the options change.
_snapshot: tuple = (None, ())
DISTRIBUTED: Optional[Options] = None
"""Options that asked for process groups (``distributed=True``), if any do; read without the lock."""
ROUTING = 0
"""A number that changes when the options that route a call change (not when a scope with the same
options opens again): compiled graphs read it, so Dynamo retraces them after such a change (their
synchronized layers were routed with the options they were traced with)."""


def _publish() -> None:
    global _snapshot, DISTRIBUTED, ROUTING
    scopes = tuple(_scopes.values())
    _snapshot = (_installed, scopes)
    every = ([_installed] if _installed is not None else []) + [options for _, options in scopes]
    DISTRIBUTED = next((options for options in reversed(every) if options.distributed), None)
    # What decides a route (the timeout does not), by identity: the same filter or group is the same.
    ROUTING = hash(tuple((options.distributed, _serial(options.process_group), _serial(options.exclude))
                         for options in every))


_serials: dict[int, tuple[Any, int]] = {}  # id(object) -> (a weak reference to it, or itself; its serial)
_next_serial = itertools.count(1)


def _serial(value: Any) -> int:
    """A number of ``value``'s own that no later object gets (an ``id`` may be reused once it is freed)."""
    if value is None:
        return 0
    key = id(value)
    known = _serials.get(key)
    if known is not None:
        held, serial = known
        if (held() if isinstance(held, weakref.ref) else held) is value:
            return serial
    try:
        held = weakref.ref(value, lambda _: _serials.pop(key, None))
    except TypeError:  # no weak references to it (some process groups): kept, as the group is anyway
        held = value
    serial = next(_next_serial)
    _serials[key] = (held, serial)
    return serial


def lock() -> "threading.RLock":
    """The one lock around these settings and the patches that follow them."""
    return _lock


def current() -> Optional[Options]:
    """The options this thread sees, or None when nothing is installed."""
    installed, scopes = _snapshot
    if scopes:
        me = threading.get_ident()
        for thread, options in reversed(scopes):
            if thread == me:
                return options
    if installed is not None:
        return installed
    return scopes[-1][1] if scopes else None


def distributed_anywhere() -> Optional[Options]:
    """Options that asked for process groups (``distributed=True``), if any do."""
    return DISTRIBUTED


def active() -> bool:
    """True while ``install()`` holds or any scope is open."""
    installed, scopes = _snapshot
    return installed is not None or bool(scopes)


def set_installed(options: Optional[Options]) -> None:
    global _installed
    with _lock:
        _installed = options
        _publish()


def installed() -> Optional[Options]:
    return _installed


def open_scope(options: Options) -> int:
    with _lock:
        token = next(_tokens)
        _scopes[token] = (threading.get_ident(), options)
        _publish()
        return token


def close_scope(token: int) -> None:
    with _lock:
        _scopes.pop(token, None)
        _publish()


class Holder(Protocol):
    def acquire(self) -> None: ...

    def release(self) -> None: ...


_patches: Optional[Holder] = None


def hold_patches_with(patches: Holder) -> None:
    """``patching`` hands over its patches, which every synchronized forward then holds."""
    global _patches
    _patches = patches


def hold_patches() -> Callable[[], None]:
    """Hold the patches for one forward (from ``replicate`` to its last replica's end); returns the release."""
    patches = _patches
    if patches is None:
        return lambda: None
    with _lock:
        patches.acquire()

    def release() -> None:
        with _lock:
            patches.release()

    return release
