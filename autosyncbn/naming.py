"""Which module made a ``F.batch_norm`` call, and what it is called.

A call of ``torch.nn.functional.batch_norm`` does not say which module made
it. The caller's frame does: the nearest frame up the stack whose ``self``
is an ``nn.Module`` (``_BatchNorm.forward``, timm's ``BatchNormAct2d``, a
conditional BatchNorm's forward) is the owner. Its qualified name comes from
``convert_model`` when that named it, else from the chain of modules on the
stack (each one found among its caller's children), cached on the module.
The caller's frame is read for every training call except those
``dispatch.nothing_to_synchronize`` lets through first (the main thread, no
DataParallel forward registered, no ``install(distributed=True)``, no
``sync_report`` open); the walk up the stack and the qualified name only for
calls made by a function rather than a module, and for calls that
synchronize or are reported.
"""
from __future__ import annotations

import sys
from types import FrameType
from typing import Optional

from torch import nn

NAME_ATTRIBUTE = "_autosyncbn_name"
"""A module's qualified name, recorded by ``convert_model`` or found on first use."""

_SKIPPED = ("autosyncbn.", "wrapt", "torch.nn.functional", "torch.nn.modules.module")
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
_MAX_FRAMES = 64
_MAX_NAMING_FRAMES = 1024  # once per layer; torch.compile's tracer stands ~120 frames below the model's call


def _module_of(frame: FrameType) -> Optional[nn.Module]:
    code = frame.f_code
    if code.co_argcount == 0 or code.co_varnames[0] != "self":
        return None
    candidate = frame.f_locals.get("self")
    return candidate if isinstance(candidate, nn.Module) else None


def _frames_above_autosyncbn() -> Optional[FrameType]:
    frame: Optional[FrameType] = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_SKIPPED):
        frame = frame.f_back
    return frame


def calling_module() -> Optional[nn.Module]:
    """The module whose code called ``F.batch_norm`` (None for a call outside every module)."""
    frame = _frames_above_autosyncbn()
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        module = _module_of(frame)
        if module is not None:
            return module
        frame = frame.f_back
    return None


def record_name(module: nn.Module, name: str) -> None:
    module.__dict__[NAME_ATTRIBUTE] = name


def qualified_name(owner: Optional[nn.Module]) -> str:
    """``owner``'s recorded name, else its path from the outermost calling module (cached)."""
    if owner is None:
        return "<F.batch_norm outside any module>"
    name = owner.__dict__.get(NAME_ATTRIBUTE)
    if name is None:
        name = _path_on_stack(owner) or f"<{type(owner).__name__}>"
        record_name(owner, name)
    return name


def _path_on_stack(owner: nn.Module) -> Optional[str]:
    """``parent.child...owner`` from the modules whose calls are on the stack."""
    chain = [owner]
    frame = _frames_above_autosyncbn()
    for _ in range(_MAX_NAMING_FRAMES):
        if frame is None:
            break
        module = _module_of(frame)
        if module is not None and module is not chain[-1]:
            if _child_name(module, chain[-1]) is None:
                break  # called, but not its registered descendant: the path ends here
            chain.append(module)
        frame = frame.f_back
    parts: list = [_child_name(parent, child) for child, parent in zip(chain, chain[1:])]  # innermost first
    while parts and _is_wrapper(chain[-1]):
        # "module." of DataParallel/DDP, "_orig_mod." of torch.compile say nothing of the layer
        chain.pop()
        below = parts.pop().partition(".")[2]
        if below:
            parts.append(below)
    return ".".join(reversed(parts)) if parts else None


def _is_wrapper(module: nn.Module) -> bool:
    return isinstance(module, _WRAPPERS) or type(module).__name__ == "OptimizedModule"


def _child_name(parent: nn.Module, child: nn.Module) -> Optional[str]:
    """``child``'s name in ``parent``: a direct child's key, else its dotted path among the
    descendants (frames between them may be missing: torch.compile's tracer runs none)."""
    for key, value in parent._modules.items():
        if value is child:
            return key
    for path, value in parent.named_modules():
        if value is child:
            return path
    return None
