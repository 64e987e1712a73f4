"""How ``eps`` enters synchronized normalization: PyTorch's ``var + eps`` or the classic clamp."""
from __future__ import annotations

_EPS_MODES = ("plus", "clamp")
_eps_mode = "plus"


def set_sbn_eps_mode(mode: str) -> None:
    """Choose ``'plus'`` (the default, PyTorch's rule: ``x_hat = (x - mean) / sqrt(var + eps)``)
    or ``'clamp'`` (the classic ``sync_batchnorm`` rule: ``/ sqrt(max(var, eps))``).

    Applies to synchronized calls; unsynchronized ones are PyTorch's own.
    """
    global _eps_mode
    if mode not in _EPS_MODES:
        raise ValueError(f"set_sbn_eps_mode expects one of {_EPS_MODES}, got {mode!r}")
    _eps_mode = mode


def get_sbn_eps_mode() -> str:
    """The current mode: ``'plus'`` or ``'clamp'``."""
    return _eps_mode
