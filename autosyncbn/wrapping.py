"""The one way autosyncbn patches anything: a wrapt wrapper it can find, switch off and remove.

Every patch site (the global table of ``install()``, the per-instance hook of
``patch_replication_callback``, the CPU broadcast seam of ``testing``, the
name rebinding of ``patch_sync_batchnorm``) is a :class:`Patch`, and every
group of patches that is shared by several users is a :class:`SharedPatches`.

Other libraries patch the same attributes (profilers, tracers, quantizers),
so a patch never assumes it is the outermost layer, as OpenTelemetry's
instrumentors and wrapt's own guide advise:

- ``apply()`` records the exact original from ``vars(owner)`` and whether the
  owner held it itself, and puts our wrapper on top of whatever is there now;
  when our old, switched-off wrapper is still buried in the chain, it is
  switched back on instead of wrapping twice;
- ``restore()`` puts the original back only while our wrapper is still the
  attribute. When another library wrapped on top of it, the chain is left
  alone and our wrapper becomes a pass-through; when our wrapper is gone from
  the chain, nothing is touched, so no removed patch is ever resurrected;
- ``is_live()`` says whether our wrapper is in the attribute's chain and on.
"""
from __future__ import annotations

import inspect
import threading
from typing import Any, Callable, Iterable, Optional

import wrapt

Wrapper = Callable[[Callable, Any, tuple, dict], Any]
"""wrapt's wrapper signature: ``(wrapped, instance, args, kwargs) -> result``."""

_MISSING = object()


class _AutosyncbnWrapper(wrapt.FunctionWrapper):
    """A ``wrapt.FunctionWrapper`` that says it is autosyncbn's (found by identity in a chain).

    A wrapped function is one object: copies and deep copies (of a module that
    holds a reference to it) are the wrapper itself.
    """

    def __copy__(self) -> "_AutosyncbnWrapper":
        return self

    def __deepcopy__(self, memo: dict) -> "_AutosyncbnWrapper":
        return self


def _chain(value: Any) -> Iterable[Any]:
    """``value``, then what it wraps, and so on (wrapt proxies and functools.wraps alike)."""
    seen = 0
    while value is not None and seen < 64:
        yield value
        value = getattr(value, "__wrapped__", None)
        seen += 1


class Patch:
    """One attribute of one owner, either wrapped (``wrapper``) or replaced (``replacement``).

    Args:
        owner: the class, module or instance holding the attribute.
        attribute: its name.
        wrapper: a wrapt wrapper ``(wrapped, instance, args, kwargs)``.
        replacement: an object to put in place of the attribute instead
            (for names that must stay classes, such as ``nn.BatchNorm2d``).
    """

    def __init__(self, owner: Any, attribute: str, wrapper: Optional[Wrapper] = None,
                 replacement: Any = None) -> None:
        if (wrapper is None) == (replacement is None):
            raise TypeError("a Patch takes exactly one of wrapper= and replacement=")
        self.owner = owner
        self.attribute = attribute
        self.wrapper = wrapper
        self.replacement = replacement
        # wrapt's enabled= switch, read at every call: a C method (len of a list), no Python frame.
        self._on: list = []
        self._installed: Any = None  # our wrapper (or replacement) as last put in place
        self._original: Any = _MISSING
        self._owned = False

    def __repr__(self) -> str:
        owner = getattr(self.owner, "__name__", type(self.owner).__name__)
        return f"Patch({owner}.{self.attribute}, {'on' if self.active else 'off'})"

    @property
    def active(self) -> bool:
        """Whether our wrapper acts (off: a pass-through, buried under another library's)."""
        return bool(self._on)

    @active.setter
    def active(self, on: bool) -> None:
        self._on[:] = [True] if on else []

    # -- state -----------------------------------------------------------------
    def current(self) -> Any:
        """What the attribute is now (through the class hierarchy, unbound)."""
        return inspect.getattr_static(self.owner, self.attribute, None)

    def is_live(self) -> bool:
        """Our wrapper is on and reachable from the attribute (maybe under others')."""
        if not self.active or self._installed is None:
            return False
        if self.replacement is not None:
            return self.current() is self._installed
        return any(link is self._installed for link in _chain(self.current()))

    # -- apply / restore ---------------------------------------------------------
    def apply(self) -> None:
        """Put our wrapper on top (or switch our buried one back on). Idempotent."""
        if self.is_live():
            return
        if self._installed is not None and self.replacement is None and any(
            link is self._installed for link in _chain(self.current())
        ):
            self.active = True  # still in the chain under another library's wrapper
            return
        namespace = vars(self.owner)
        self._owned = self.attribute in namespace
        # Only the owner's own attribute is kept, to put back: an inherited one is deleted on
        # restore, and keeping it (bound, maybe another library's proxy) would stop copies and
        # pickles of an instance that holds this patch.
        self._original = namespace[self.attribute] if self._owned else _MISSING
        if self.replacement is not None:
            installed: Any = self.replacement
        else:
            target = self._original if self._owned else getattr(self.owner, self.attribute)
            assert self.wrapper is not None  # __init__ takes exactly one of wrapper= and replacement=
            # enabled: len() of a list, a C method (truthy as wrapt needs), no Python frame per call
            installed = _AutosyncbnWrapper(target, self.wrapper,
                                           enabled=self._on.__len__)  # type: ignore[arg-type]
        setattr(self.owner, self.attribute, installed)
        self._installed = installed
        self.active = True

    def restore(self) -> None:
        """Take our patch out without tearing another library's chain. Idempotent."""
        self.active = False
        if self._installed is not None and vars(self.owner).get(self.attribute, _MISSING) is self._installed:
            if self._owned:
                setattr(self.owner, self.attribute, self._original)
            else:
                delattr(self.owner, self.attribute)
            self._installed = None
            self._original = _MISSING
        # Otherwise another library wrapped on top of ours (we stay, switched off,
        # as a pass-through, and leave when it unwraps and we are asked again) or
        # removed ours already (nothing of ours is left to take out).


class SharedPatches:
    """Patches applied while at least one user holds them; the last to leave restores.

    ``acquire()``/``release()`` count users under one lock. Applying is
    transactional: if one patch fails, those already applied are restored.
    """

    def __init__(self, patches: Callable[[], list[Patch]]) -> None:
        self._make = patches
        self._patches: list[Patch] = []
        self._users = 0
        self.lock = threading.RLock()

    @property
    def users(self) -> int:
        return self._users

    def acquire(self) -> None:
        with self.lock:
            if self._users == 0:
                self._patches = self._patches or self._make()
                apply_all(self._patches)
            self._users += 1

    def release(self) -> None:
        with self.lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                for patch in reversed(self._patches):
                    patch.restore()

    def reapply(self) -> None:
        """Put back any of our patches another library removed, while we are in use."""
        with self.lock:
            if self._users:
                apply_all(self._patches)

    def is_live(self) -> bool:
        with self.lock:
            return self._users > 0 and all(patch.is_live() for patch in self._patches)


def apply_all(patches: list[Patch]) -> None:
    """Apply every patch, or none: a failure restores those already applied."""
    applied: list[Patch] = []
    try:
        for patch in patches:
            if not patch.is_live():
                patch.apply()
                applied.append(patch)
    except BaseException:
        for patch in reversed(applied):
            patch.restore()
        raise
