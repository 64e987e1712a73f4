"""``SynchronizedBatchNorm1d/2d/3d`` and ``SynchronizedBatchNorm``, ``convert_model``,
``revert_model``, ``exclude`` and ``include``.

The classes are subclasses of ``nn.BatchNorm1d/2d/3d`` (``SynchronizedBatchNorm``,
what ``nn.SyncBatchNorm`` converts to, takes any input rank), so ``isinstance``
checks, weight-init loops and ``state_dict`` keys keep working. Their forward
is ``_BatchNorm.forward`` itself, with its ``F.batch_norm`` resolved to
``dispatch.explicit_batch_norm``: outside a
synchronized context it *is* PyTorch's BatchNorm, bit for bit. Under
``torch.jit.script`` the forward is PyTorch's own (synchronization needs
Python), so a converted model scripts as the plain one does.
"""
from __future__ import annotations

import builtins
import inspect
import sys
import types
from typing import Any, Callable, Optional, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import compiling, dispatch
from .naming import record_name
from .parallel import DataParallelWithCallback
from .replicas import EXCLUDED_ATTRIBUTE


class _LayerFunctional(types.ModuleType):
    """``torch.nn.functional`` as autosyncbn's layers see it: ``batch_norm`` is autosyncbn's."""

    batch_norm = staticmethod(dispatch.explicit_batch_norm)

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)


_LAYER_FUNCTIONAL = _LayerFunctional("autosyncbn.layer_functional")
_SYNCHRONIZED_FORWARD = "__autosyncbn_synchronized__"
_overlays: dict[int, dict] = {}  # id(module globals) -> its overlay (module namespaces live as long as we do)


def _overlay(namespace: dict) -> dict:
    """A namespace where ``F`` (and ``batch_norm`` imported by name) is autosyncbn's and every other
    name is read live from ``namespace``.

    A dict subclass whose ``__missing__`` is ``namespace.__getitem__`` (a C
    method, so a global read costs no Python call): a flag set, a helper
    monkeypatched or a ``global`` assigned in the module later is seen, as by
    the original function. (A ``global`` assignment made inside the
    synchronized forward itself stays in the overlay.)

    Its ``__name__`` names a module in ``sys.modules`` whose attributes are the
    overlay's (:class:`_OverlayModule`): Dynamo (``torch.compile``) reads a
    traced function's globals from the function, but guards them as attributes
    of the module its ``__name__`` names.
    """
    overlay = _overlays.get(id(namespace))
    if overlay is None:
        def keys(self: dict) -> set:  # what copies see (TorchScript's resolution, debuggers): every name
            return namespace.keys() | dict.keys(self)

        def get(self: dict, name: str, default: Any = None) -> Any:
            return dict.get(self, name, namespace.get(name, default))

        # ``in`` and ``get`` too: Dynamo (torch.compile) reads the globals of the code it traces so.
        cls = type("SynchronizedNamespace", (dict,), {
            "__slots__": (), "__missing__": namespace.__getitem__, "keys": keys,
            "__iter__": lambda self: iter(keys(self)), "__len__": lambda self: len(keys(self)),
            "__contains__": lambda self, name: dict.__contains__(self, name) or name in namespace, "get": get})
        # ``F``, and PyTorch's batch_norm imported by name (``from torch.nn.functional import batch_norm``)
        plain = (dispatch.PLAIN_BATCH_NORM, F.batch_norm)  # PyTorch's, and its patch if install() holds now
        ours = {name: dispatch.explicit_batch_norm for name, value in namespace.items() if value in plain}
        name = f"{__name__}.synchronized_{len(_overlays)}_{namespace.get('__name__', '')}"
        overlay = cls(F=_LAYER_FUNCTIONAL, __builtins__=namespace.get("__builtins__", builtins),
                      __name__=name, **ours)
        sys.modules[name] = _OverlayModule(name, overlay)
        _overlays[id(namespace)] = overlay
    return overlay


class _OverlayModule(types.ModuleType):
    """A module whose attributes are read from an overlay namespace (see :func:`_overlay`)."""

    def __init__(self, name: str, overlay: dict) -> None:
        super().__init__(name, "Globals of autosyncbn's synchronized forwards (read from the overlay).")
        self.__dict__["_overlay"] = overlay

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_overlay"][name]
        except KeyError:
            raise AttributeError(name) from None


def _with_synchronized_batch_norm(forward: Callable) -> Callable:
    """``forward`` itself (PyTorch's ``_BatchNorm.forward``, or a subclass's), its ``F.batch_norm``
    being :func:`dispatch.explicit_batch_norm`: the same code, every option, every new argument."""
    synchronized = types.FunctionType(forward.__code__, _overlay(forward.__globals__), forward.__name__,
                                      forward.__defaults__, _closure(forward))
    synchronized.__kwdefaults__ = forward.__kwdefaults__
    synchronized.__qualname__ = forward.__qualname__
    synchronized.__module__ = forward.__module__
    synchronized.__doc__ = forward.__doc__
    synchronized.__dict__.update(forward.__dict__)
    synchronized.__wrapped__ = forward  # type: ignore[attr-defined]
    setattr(synchronized, _SYNCHRONIZED_FORWARD, True)
    return synchronized


def forward_of(cls: type) -> Any:
    """The forward ``cls`` defines or inherits, as its class holds it."""
    return vars(next(base for base in cls.__mro__ if "forward" in vars(base)))["forward"]


def synchronized_forward(cls: type) -> Callable:
    """``cls``'s forward, its ``F.batch_norm`` being :func:`dispatch.explicit_batch_norm` (made anew
    unless it is already; a forward that is no Python function is left as it is)."""
    forward = forward_of(cls)
    if isinstance(forward, types.FunctionType) and not getattr(forward, _SYNCHRONIZED_FORWARD, False):
        return _with_synchronized_batch_norm(forward)
    return forward


def _closure(forward: Callable) -> Optional[tuple]:
    """``forward``'s closure cells, with PyTorch's batch_norm (captured from an enclosing scope) made
    autosyncbn's; every other cell is the same cell (``super()``'s ``__class__`` among them)."""
    cells = forward.__closure__
    if not cells:
        return cells
    plain = (dispatch.PLAIN_BATCH_NORM, F.batch_norm)
    return tuple(types.CellType(dispatch.explicit_batch_norm) if _contents(cell) in plain else cell for cell in cells)


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a name not yet bound in the enclosing scope)
        return None


def _synchronized_signature(cls: type) -> Optional[inspect.Signature]:
    """What ``inspect`` shows for ``cls``: the BatchNorm class's own arguments, and ``process_group``.

    None where a subclass defines its own ``__init__``: inspect then reads that.
    """
    init_owner = next(base for base in cls.__mro__ if "__init__" in vars(base))
    if init_owner is not _SynchronizedBatchNormMixin:
        return None
    plain = next(base for base in cls.__mro__ if "__init__" in vars(base)
                 and not issubclass(base, _SynchronizedBatchNormMixin))
    try:
        signature = inspect.signature(plain)
    except (TypeError, ValueError):
        return None
    if "process_group" in signature.parameters:  # nn.SyncBatchNorm and its subclasses
        return signature
    parameters = list(signature.parameters.values())
    extra = inspect.Parameter("process_group", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    parameters.insert(at, extra)  # before **kwargs (detectron2's NaiveSyncBatchNorm takes them)
    return signature.replace(parameters=parameters)


class _SynchronizedBatchNormMixin:
    """Synchronize across DataParallel replicas (under the explicit API or ``install()``) or
    across a process group while using batch statistics; else PyTorch's path.

    Takes every argument of the BatchNorm class it is mixed into, plus
    ``process_group`` (keyword). Its forward is that class's own (see
    :func:`_with_synchronized_batch_norm`).
    """

    # A process group is no TorchScript type; scripted layers never synchronize. Not annotated
    # (ClassVar): TorchScript reads the first class annotations up the bases, and any here would
    # hide _NormBase's (momentum: Optional[float], ...) from it.
    __jit_ignored_attributes__ = ["process_group"]  # noqa: RUF012
    _autosyncbn_explicit = True  # dispatch: a layer of the explicit API

    _call_impl = compiling.call_impl  # under torch.compile the layer says who it is

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        compiling.ROUTED_ALWAYS.add(cls)
        # The forward that runs: a subclass's own (kept, its F.batch_norm made autosyncbn's), one
        # already synchronized further up, or the BatchNorm class's, synchronized here.
        forward = synchronized_forward(cls)
        if forward is not cls.forward:  # type: ignore[attr-defined]
            cls.forward = forward  # type: ignore[attr-defined]
        cls.__signature__ = _synchronized_signature(cls)  # type: ignore[attr-defined]

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group


class SynchronizedBatchNorm1d(_SynchronizedBatchNormMixin, nn.BatchNorm1d):
    r"""BatchNorm over a 2D or 3D input, with statistics over the whole batch across replicas.

    Same arguments, parameters, buffers and ``state_dict`` keys as
    :class:`torch.nn.BatchNorm1d`. Under :class:`DataParallelWithCallback`,
    a patched ``nn.DataParallel``, ``autosyncbn.install()``, or a
    ``torch.distributed`` process group of 2+ ranks, training-mode calls
    normalize with the mean and variance of the whole batch.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, L)` or :math:`(N, C)`
        eps: value added to the variance for numerical stability. Default: 1e-5
        momentum: running-average factor; ``None`` for a cumulative average. Default: 0.1
        affine: learnable weight and bias. Default: ``True``
        track_running_stats: keep running estimates. Default: ``True``
        process_group: the ``torch.distributed`` group to synchronize over when
            one is initialized (default: the world)

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`
        - Output: same shape as input

    Examples::

        >>> bn = SynchronizedBatchNorm1d(100)
        >>> model = DataParallelWithCallback(nn.Sequential(nn.Linear(20, 100), bn))
    """


class SynchronizedBatchNorm2d(_SynchronizedBatchNormMixin, nn.BatchNorm2d):
    r"""BatchNorm over a 4D input :math:`(N, C, H, W)`, synchronized across replicas.

    See :class:`SynchronizedBatchNorm1d`; arguments as :class:`torch.nn.BatchNorm2d`.

    Examples::

        >>> bn = SynchronizedBatchNorm2d(64)
    """


class SynchronizedBatchNorm3d(_SynchronizedBatchNormMixin, nn.BatchNorm3d):
    r"""BatchNorm over a 5D input :math:`(N, C, D, H, W)`, synchronized across replicas.

    See :class:`SynchronizedBatchNorm1d`; arguments as :class:`torch.nn.BatchNorm3d`.

    Examples::

        >>> bn = SynchronizedBatchNorm3d(16)
    """


class _BatchNormXd(_BatchNorm):
    """Plain BatchNorm for any input rank >= 2, as ``nn.SyncBatchNorm`` accepts."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


class SynchronizedBatchNorm(_SynchronizedBatchNormMixin, _BatchNormXd):
    r"""Synchronized BatchNorm for any input rank >= 2: what ``convert_model`` makes of ``nn.SyncBatchNorm``.

    See :class:`SynchronizedBatchNorm1d`; arguments as :class:`torch.nn.SyncBatchNorm`.

    Shape:
        - Input: :math:`(N, C, +)`
        - Output: same shape as input
    """


_TO_SYNCHRONIZED: dict[type, type[_BatchNorm]] = {
    nn.BatchNorm1d: SynchronizedBatchNorm1d,
    nn.BatchNorm2d: SynchronizedBatchNorm2d,
    nn.BatchNorm3d: SynchronizedBatchNorm3d,
    nn.SyncBatchNorm: SynchronizedBatchNorm,
    _BatchNormXd: SynchronizedBatchNorm,
}
_TO_PLAIN = {
    SynchronizedBatchNorm1d: nn.BatchNorm1d,
    SynchronizedBatchNorm2d: nn.BatchNorm2d,
    SynchronizedBatchNorm3d: nn.BatchNorm3d,
    SynchronizedBatchNorm: _BatchNormXd,
    nn.SyncBatchNorm: _BatchNormXd,
}


_SYNCHRONIZED_SUBCLASSES: dict[type, type[_BatchNorm]] = {}


def _synchronized_class(base: type) -> type[_BatchNorm]:
    """The synchronized twin of another ``_BatchNorm`` subclass (timm's ``BatchNormAct2d``, say):
    its own forward, with autosyncbn's ``F.batch_norm`` (made once per class)."""
    cls = _SYNCHRONIZED_SUBCLASSES.get(base)
    if cls is None:
        namespace: dict[str, Any] = {"__module__": __name__, "_autosyncbn_base": base,
                                     "__reduce_ex__": _reduce_synchronized}
        cls = type(f"Synchronized{base.__name__}", (_SynchronizedBatchNormMixin, base), namespace)
        _SYNCHRONIZED_SUBCLASSES[base] = cls
    return cls


def _reduce_synchronized(self: nn.Module, protocol: int) -> tuple:
    """Pickles and deep copies name the base class, which can be imported (the twin is made anew)."""
    reduced = object.__reduce_ex__(self, protocol)
    return (_new_synchronized, (type(self)._autosyncbn_base,), *reduced[2:])  # type: ignore[attr-defined]


def _new_synchronized(base: type) -> nn.Module:
    cls = _synchronized_class(base)
    return cls.__new__(cls)


def is_synchronized_class(layer: nn.Module) -> bool:
    return isinstance(layer, _SynchronizedBatchNormMixin)


def _rebuild(layer: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A ``cls`` layer sharing ``layer``'s parameters, buffers, options, mode and attributes."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in vars(layer).items():
        if key not in ("_parameters", "_buffers", "_modules", "training", "process_group"):
            # Hook tables are copied, so the old and new layer never share one.
            new.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value
    # The same Parameter and buffer objects: optimizers built earlier stay valid.
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._modules = dict(layer._modules)
    new._non_persistent_buffers_set = set(layer._non_persistent_buffers_set)
    new.training = layer.training
    return new


M = TypeVar("M", bound=nn.Module)


def _require_module(module: Any, function: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{function} expects an nn.Module, got {type(module).__name__}")


def _convert_children(module: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> None:
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = convert(child)


def _once_per_module(convert: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    """``convert`` made once per module object: a layer registered under two names (or shared
    by two blocks) stays one layer, as on the model before."""
    done: dict[int, nn.Module] = {}

    def once(module: nn.Module) -> nn.Module:
        key = id(module)
        if key not in done:
            done[key] = convert(module)
        return done[key]

    return once


def _data_parallel_as(module: nn.DataParallel, cls: type[nn.DataParallel], inner: nn.Module) -> nn.DataParallel:
    """A ``cls`` around ``inner`` with ``module``'s devices (a device-less one stays device-less)."""
    if not module.device_ids:
        wrapped = cls.__new__(cls)
        nn.Module.__init__(wrapped)
        wrapped.module = inner
        wrapped.device_ids = []
        wrapped.training = module.training
        return wrapped
    return cls(inner, device_ids=module.device_ids, output_device=module.output_device, dim=module.dim)


def convert_model(module: M, process_group: Any = None) -> M:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` by its synchronized twin.

    Options, the very same parameter and buffer objects (so ``requires_grad``,
    device, dtype and optimizers carry over) and train/eval mode are kept;
    ``nn.SyncBatchNorm`` becomes :class:`SynchronizedBatchNorm`, which accepts
    every input rank it did. An ``nn.DataParallel`` becomes a
    :class:`DataParallelWithCallback` with the same devices. Every other
    ``_BatchNorm`` subclass (timm's ``BatchNormAct2d``, say) becomes its
    synchronized twin: a subclass whose forward is its own, calling
    autosyncbn's ``F.batch_norm``. (One that calls ``F.batch_norm`` under
    another name synchronizes under DataParallel still, and is warned about
    where it cannot.)

    Args:
        module: the model (or an ``nn.DataParallel`` around it).
        process_group: the ``torch.distributed`` group the converted layers
            synchronize over (default: an ``nn.SyncBatchNorm``'s own group, else the world).

    Examples::

        >>> model = convert_model(torchvision.models.resnet18())
        >>> model = convert_model(nn.DataParallel(model, device_ids=[0, 1]))
    """
    _require_module(module, "convert_model")
    convert: Callable[[nn.Module], nn.Module] = _once_per_module(lambda child: _convert(child, process_group, convert))
    converted = convert(module)
    # Qualified names tell layers apart across ranks in error messages.
    for name, layer in converted.named_modules():
        if is_synchronized_class(layer):
            record_name(layer, name or "<root>")
    return converted  # type: ignore[return-value]


def _convert(module: M, process_group: Any, convert: Callable[[nn.Module], nn.Module]) -> M:
    if isinstance(module, nn.DataParallel):
        inner = convert(module.module)
        return _data_parallel_as(module, DataParallelWithCallback, inner)  # type: ignore[return-value]
    if isinstance(module, LazyModuleMixin) and isinstance(module.cls_to_become, type):
        # An uninitialized lazy layer: it becomes the synchronized twin of what it would have become.
        becomes = module.cls_to_become
        module.cls_to_become = _TO_SYNCHRONIZED.get(becomes) or _synchronized_class(becomes)
        module.process_group = process_group
        return module
    target = _TO_SYNCHRONIZED.get(type(module))
    if target is None and isinstance(module, _BatchNorm) and not is_synchronized_class(module):
        target = _synchronized_class(type(module))
    converted: nn.Module = module
    if target is not None:
        converted = _rebuild(module, target)  # type: ignore[arg-type]
        converted.process_group = process_group if process_group is not None else getattr(  # type: ignore[assignment]
            module, "process_group", None)  # Module.__setattr__ takes any value, not only Tensor | Module
    _convert_children(converted, convert)
    return converted  # type: ignore[return-value]


def revert_model(module: M) -> M:
    """The way back: synchronized layers and ``nn.SyncBatchNorm`` -> plain BatchNorm, for export and inference.

    ``SynchronizedBatchNorm*d`` become ``nn.BatchNorm*d``; ``SynchronizedBatchNorm``
    and ``nn.SyncBatchNorm`` become a plain BatchNorm accepting every input rank
    >= 2, as they did. Parameters and buffers are shared, not copied. A
    ``DataParallelWithCallback`` becomes an ``nn.DataParallel`` with the same devices.
    """
    _require_module(module, "revert_model")
    revert: Callable[[nn.Module], nn.Module] = _once_per_module(lambda child: _revert(child, revert))
    return revert(module)  # type: ignore[return-value]


def _revert(module: M, revert: Callable[[nn.Module], nn.Module]) -> M:
    if isinstance(module, DataParallelWithCallback):
        return _data_parallel_as(module, nn.DataParallel, revert(module.module))  # type: ignore[return-value]
    if isinstance(module, LazyModuleMixin):
        module.__dict__.pop("cls_to_become", None)  # what convert_model set
        module.__dict__.pop("process_group", None)
    target = _TO_PLAIN.get(type(module)) or getattr(type(module), "_autosyncbn_base", None)
    reverted = _rebuild(module, target) if target is not None else module  # type: ignore[arg-type]
    _convert_children(reverted, revert)
    return reverted  # type: ignore[return-value]


def exclude(*modules: nn.Module) -> None:
    """Leave every BatchNorm call made by ``modules`` (and the modules inside them) per slice.

    Those calls take PyTorch's own per-slice path even under ``install()``,
    :class:`DataParallelWithCallback` or a process group. Undo with :func:`include`.

    Examples::

        >>> autosyncbn.exclude(model.head)   # keep the head's BatchNorm per device
    """
    for module in modules:
        _require_module(module, "exclude")
        for layer in module.modules():
            layer.__dict__[EXCLUDED_ATTRIBUTE] = True


def include(*modules: nn.Module) -> None:
    """Undo :func:`exclude` for ``modules`` and the modules inside them."""
    for module in modules:
        _require_module(module, "include")
        for layer in module.modules():
            layer.__dict__.pop(EXCLUDED_ATTRIBUTE, None)
