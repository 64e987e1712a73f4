"""``SynchronizedBatchNorm1d/2d/3d``, ``convert_model``, ``revert_model`` and ``exclude``.

The classes are subclasses of ``nn.BatchNorm1d/2d/3d``, so ``isinstance``
checks, weight-init loops and ``state_dict`` keys keep working. Outside a
synchronized context they *are* PyTorch's BatchNorm (``super().forward``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import record_name
from .forward import EXCLUDED_ATTRIBUTE, active_handle, synchronized_forward


class _SynchronizedBatchNormMixin:
    """Synchronize across DataParallel replicas (a handle is attached) or across the
    process group (``torch.distributed`` is initialized) while training; else PyTorch's path."""

    process_group: Any = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, process_group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,  # type: ignore[call-arg]
                         device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        handle = active_handle(self, True, self.process_group)  # type: ignore[arg-type]
        if handle is None:
            return super().forward(input)  # type: ignore[misc]
        return synchronized_forward(self, input, handle)  # type: ignore[arg-type]


class SynchronizedBatchNorm1d(_SynchronizedBatchNormMixin, nn.BatchNorm1d):
    r"""BatchNorm over a 2D or 3D input, with statistics over the whole batch across replicas.

    Same arguments, parameters, buffers and ``state_dict`` keys as
    :class:`torch.nn.BatchNorm1d`. Under :class:`DataParallelWithCallback`,
    a patched ``nn.DataParallel`` or ``autosyncbn.install()``, training-mode
    calls normalize with the mean and variance of the whole batch.

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


_TO_SYNCHRONIZED = {
    nn.BatchNorm1d: SynchronizedBatchNorm1d,
    nn.BatchNorm2d: SynchronizedBatchNorm2d,
    nn.BatchNorm3d: SynchronizedBatchNorm3d,
}
_TO_PLAIN = {sync: plain for plain, sync in _TO_SYNCHRONIZED.items()}


def is_synchronized_class(layer: nn.Module) -> bool:
    return isinstance(layer, _SynchronizedBatchNormMixin)


class _BatchNormXd(_BatchNorm):
    """Plain BatchNorm for any input rank: what ``revert_model`` makes of ``nn.SyncBatchNorm``,
    whose input rank is not known until it runs."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _rebuild(layer: _BatchNorm, cls: type) -> _BatchNorm:
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


def _convert_children(module: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> None:
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = convert(child)


def convert_model(module: M, process_group: Any = None) -> M:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (and ``nn.SyncBatchNorm``) by its synchronized twin.

    Options, the very same parameter and buffer objects (so ``requires_grad``,
    device, dtype and optimizers carry over) and train/eval mode are kept. An
    ``nn.DataParallel`` becomes a :class:`DataParallelWithCallback` with the
    same devices. Subclasses of BatchNorm with their own behaviour are left alone.

    Args:
        module: the model (or an ``nn.DataParallel`` around it).
        process_group: the ``torch.distributed`` group the converted layers
            synchronize over (default: an ``nn.SyncBatchNorm``'s own group, else the world).

    Examples::

        >>> model = convert_model(torchvision.models.resnet18())
        >>> model = convert_model(nn.DataParallel(model, device_ids=[0, 1]))
    """
    converted = _convert(module, process_group)
    # Qualified names tell layers apart across ranks in error messages.
    for name, layer in converted.named_modules():
        if is_synchronized_class(layer):
            record_name(layer, name or "<root>")
    return converted


def _convert(module: M, process_group: Any) -> M:
    from .parallel import DataParallelWithCallback

    if isinstance(module, nn.DataParallel):
        inner = _convert(module.module, process_group)
        if not module.device_ids:
            wrapped = DataParallelWithCallback.__new__(DataParallelWithCallback)
            nn.Module.__init__(wrapped)
            wrapped.module = inner
            wrapped.device_ids = []
            wrapped.training = module.training
            return wrapped  # type: ignore[return-value]
        return DataParallelWithCallback(  # type: ignore[return-value]
            inner, device_ids=module.device_ids, output_device=module.output_device, dim=module.dim
        )
    target = _TO_SYNCHRONIZED.get(type(module))
    if target is None and type(module) is nn.SyncBatchNorm:
        target = _synchronized_class_for(module)
    converted = module
    if target is not None:
        converted = _rebuild(module, target)  # type: ignore[arg-type]
        converted.process_group = process_group if process_group is not None else getattr(module, "process_group", None)
    _convert_children(converted, lambda child: _convert(child, process_group))
    return converted  # type: ignore[return-value]


def _synchronized_class_for(layer: nn.SyncBatchNorm) -> type:
    # SyncBatchNorm does not know its input rank; 2d is what it wraps most often.
    return SynchronizedBatchNorm2d


def revert_model(module: M) -> M:
    """The way back: ``SynchronizedBatchNorm*d`` -> ``nn.BatchNorm*d``, ``nn.SyncBatchNorm`` -> plain.

    For export and inference. Parameters and buffers are shared, not copied.
    A ``DataParallelWithCallback`` becomes its inner module's reverted copy
    wrapped in ``nn.DataParallel`` with the same devices.
    """
    from .parallel import DataParallelWithCallback

    if isinstance(module, DataParallelWithCallback):
        inner = revert_model(module.module)
        if not module.device_ids:
            plain = nn.DataParallel.__new__(nn.DataParallel)
            nn.Module.__init__(plain)
            plain.module = inner
            plain.device_ids = []
            plain.training = module.training
            return plain  # type: ignore[return-value]
        return nn.DataParallel(  # type: ignore[return-value]
            inner, device_ids=module.device_ids, output_device=module.output_device, dim=module.dim
        )
    target: Optional[type] = None
    if is_synchronized_class(module):
        target = next(plain for sync, plain in _TO_PLAIN.items() if isinstance(module, sync))
    elif type(module) is nn.SyncBatchNorm:
        target = _BatchNormXd
    reverted = _rebuild(module, target) if target is not None else module  # type: ignore[arg-type]
    _convert_children(reverted, revert_model)
    return reverted  # type: ignore[return-value]


def exclude(*modules: nn.Module) -> None:
    """Leave every BatchNorm layer in ``modules`` (recursively) unsynchronized.

    Those layers take PyTorch's own per-slice path even under ``install()``
    or :class:`DataParallelWithCallback`. Undo with :func:`include`.

    Examples::

        >>> autosyncbn.exclude(model.head)   # keep the head's BatchNorm per device
    """
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, _BatchNorm):
                layer.__dict__[EXCLUDED_ATTRIBUTE] = True


def include(*modules: nn.Module) -> None:
    """Undo :func:`exclude` for every BatchNorm layer in ``modules``."""
    for module in modules:
        for layer in module.modules():
            layer.__dict__.pop(EXCLUDED_ATTRIBUTE, None)
