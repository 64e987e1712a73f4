"""Every private PyTorch API autosyncbn uses, in one place, each with its way out.

PyTorch keeps no promise about names that start with an underscore. Each one
used here is looked up once, at import, by :func:`private`; where a version
lacks it, ``import autosyncbn`` still works and the affected path falls back
to a public API (slower, or less precise in what it detects) or raises a
:class:`MissingPrivateAPIError` naming the PyTorch version and what to do.
Tested with PyTorch 2.13 (see the README's "Versions").
"""
from __future__ import annotations

import sys
import traceback
import types
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.autograd.forward_ad as forward_ad

from .errors import SyncBatchNormError

MISSING: list[str] = []
"""The private names this PyTorch lacks (each replaced by its fallback)."""


class MissingPrivateAPIError(SyncBatchNormError):
    """A path of autosyncbn needs a private PyTorch API that this PyTorch version lacks."""


def private(owner: Any, name: str, fallback: Any) -> Any:
    """``owner.name``, or ``fallback`` (recorded in :data:`MISSING`) where this PyTorch lacks it."""
    value = getattr(owner, name, None)
    if value is None:
        MISSING.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{name}")
        return fallback
    return value


def missing(what: str, needed_for: str) -> MissingPrivateAPIError:
    """The error a path raises when its private API is missing."""
    return MissingPrivateAPIError(
        f"{needed_for} needs {what}, which PyTorch {torch.__version__} does not have (autosyncbn is tested "
        f"with PyTorch 2.13). Use a tested PyTorch version, or report this with your version.")


# -- autograd ------------------------------------------------------------------------------------
functorch_transforms_active: Callable[[], bool] = private(
    torch._C, "_are_functorch_transforms_active", lambda: False)
"""Whether a torch.func transform (vmap, grad, ...) is running (fallback: never detected)."""

top_saved_tensors_hooks: Callable[[bool], Optional[tuple]] = private(
    torch._C._autograd, "_top_saved_tensors_default_hooks", lambda ignore_is_tracing: None)
"""This thread's innermost saved-tensor hooks (pack, unpack), or None. Fallback: never any, so a
synchronized node packs every part with its maker's thread's hooks (checkpointing inside
replicas then fails in PyTorch's recompute check)."""


def function_apply(function: type) -> Callable[..., Any]:
    """An autograd Function's C ``apply``, without ``Function.apply``'s Python preamble (which serves
    torch.func transforms only); the public ``apply`` where that base is not there."""
    base = super(torch.autograd.Function, function)
    return getattr(base, "apply", None) or function.apply  # type: ignore[attr-defined]


def operator(overload: Any) -> Callable[..., Any]:
    """An ``OpOverload``'s underlying C operator (one Python call less per use), else the overload."""
    return getattr(overload, "_op", overload)


FORWARD_AD: Any = (forward_ad if hasattr(forward_ad, "_current_level") else
                   types.SimpleNamespace(_current_level=0, unpack_dual=forward_ad.unpack_dual))
"""``FORWARD_AD._current_level``: the innermost forward-AD level, -1 outside ``forward_ad.dual_level``
and ``FORWARD_AD.unpack_dual`` (fallback: level 0, so every synchronized call looks at its input's tangent)."""


# -- tracing and exceptions ------------------------------------------------------------------------
def is_fake(tensor: Any) -> bool:
    """Whether ``tensor`` is a FakeTensor (torch.compile tracing); loaded only once a non-plain tensor comes."""
    try:
        from torch._subclasses.fake_tensor import is_fake as check
    except ImportError:
        return type(tensor).__name__ == "FakeTensor"
    return check(tensor)


class _ExceptionText:
    """What ``torch._utils.ExceptionWrapper`` keeps of an error: its type and formatted traceback."""

    def __init__(self, exc_info: Any = None, where: str = "in background") -> None:
        exc_info = exc_info or sys.exc_info()
        self.exc_type = exc_info[0]
        self.exc_msg = "".join(traceback.format_exception(*exc_info))
        self.where = where

    def reraise(self) -> None:
        raise self.exc_type(f"Caught {self.exc_type.__name__} {self.where}.\nOriginal {self.exc_msg}")


def _exception_wrapper() -> type:
    try:
        from torch._utils import ExceptionWrapper
    except ImportError:
        MISSING.append("torch._utils.ExceptionWrapper")
        return _ExceptionText
    return ExceptionWrapper


if TYPE_CHECKING:  # to type checkers a class: torch's has the same attributes and reraise
    ExceptionWrapper = _ExceptionText
else:
    ExceptionWrapper = _exception_wrapper()
"""What ``parallel_apply`` wraps a replica's error in (and what the emulated runner uses too)."""


# -- nn.Module and nn.parallel ---------------------------------------------------------------------
ALWAYS_CALLED_HOOKS = "_forward_hooks_always_called"
"""The hook table whose forward hooks run also when the forward raises (PyTorch 2.1+)."""


def always_called_hooks(module: torch.nn.Module) -> dict:
    """``module``'s table of always-called forward hooks, or a clear error on a PyTorch without it."""
    table = getattr(module, ALWAYS_CALLED_HOOKS, None)
    if table is None:
        raise missing("nn.Module._forward_hooks_always_called (PyTorch 2.1+)",
                      "Reporting a replica's end and errors to its peers")
    return table


BROADCAST_SEAM = "_broadcast_coalesced_reshape"
"""The function of ``torch.nn.parallel.replicate`` that copies parameters to the devices
(the emulated CPU replicas put their copies there)."""


def process_groups(distributed_c10d: Any) -> list:
    """Every process group that exists now (``_world.pg_map``), or None where this PyTorch hides them."""
    world = getattr(distributed_c10d, "_world", None)
    groups = getattr(world, "pg_map", None) if world is not None else None
    return list(groups) if groups is not None else []
