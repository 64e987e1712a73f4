"""Synchronized BatchNorm for PyTorch Lightning, on CPU (gloo) as on GPU: a ``LayerSync`` plugin.

Lightning's ``Trainer(sync_batchnorm=True)`` converts layers to ``nn.SyncBatchNorm``,
which refuses CPU tensors and replaces a ``_BatchNorm`` subclass with its own
forward (timm's ``BatchNormAct2d``) by a plain ``SyncBatchNorm``, dropping that
forward. This plugin converts with :func:`autosyncbn.convert_model` instead::

    from autosyncbn.lightning import AutoSyncBatchNorm

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[AutoSyncBatchNorm()])

Lightning applies it when fitting starts (DDP and FSDP strategies, as its own
plugin) and reverts it when fitting ends. Both ``lightning`` (``lightning.pytorch``)
and the older ``pytorch_lightning`` package are supported: the plugin is a
``LayerSync`` of each one installed. ``import autosyncbn`` never imports Lightning;
this module does.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, Union

from torch.nn import Module

from .modules import convert_model, revert_model

if TYPE_CHECKING:
    from abc import ABCMeta

    from torch.distributed import ProcessGroup

__all__ = ["AutoSyncBatchNorm"]

_LAYER_SYNC_MODULES = ("lightning.pytorch.plugins.layer_sync", "pytorch_lightning.plugins.layer_sync")


def _layer_sync_classes() -> list[ABCMeta]:
    """``LayerSync`` of every Lightning package installed; ImportError naming the extra if none is."""
    classes, errors = [], []
    for name in _LAYER_SYNC_MODULES:
        try:
            classes.append(importlib.import_module(name).LayerSync)
        except ImportError as error:
            errors.append(error)
    if not classes:
        raise ImportError(
            "autosyncbn.lightning needs PyTorch Lightning (the `lightning` or `pytorch_lightning` package): "
            "pip install autosyncbn[lightning]"
        ) from errors[0]
    return classes


_LAYER_SYNCS = _layer_sync_classes()


class AutoSyncBatchNorm(_LAYER_SYNCS[0]):  # type: ignore[misc,valid-type]
    """Lightning plugin: every BatchNorm layer synchronizes over the strategy's processes.

    Args:
        process_group: the ``torch.distributed`` group to synchronize within, or a
            function returning it, called by :meth:`apply` on every rank once
            Lightning has initialized ``torch.distributed`` (a group cannot exist
            earlier, when the ``Trainer`` is made; with ``ddp_spawn`` the function
            must be picklable: defined at module level). Default: the world, as
            Lightning's own plugin (Lightning hands ``apply`` no group).
    """

    def __init__(self, process_group: Union[ProcessGroup, Callable[[], ProcessGroup], None] = None) -> None:
        self.process_group = process_group

    def apply(self, model: Module) -> Module:
        """Every ``_BatchNorm`` (``nn.SyncBatchNorm`` too) becomes its synchronized twin; the same parameters."""
        group = self.process_group() if callable(self.process_group) else self.process_group
        return convert_model(model, process_group=group)

    def revert(self, model: Module) -> Module:
        """Plain layers again (``nn.SyncBatchNorm`` becomes a plain BatchNorm, as in Lightning's own plugin)."""
        return revert_model(model)


for _other in _LAYER_SYNCS[1:]:  # Trainer checks isinstance(plugin, LayerSync) of its own package
    _other.register(AutoSyncBatchNorm)
