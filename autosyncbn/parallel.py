"""The replicate hook, ``DataParallelWithCallback`` and ``patch_replication_callback``.

Everything here runs in the caller's thread, right after ``replicate`` made
the replicas and before ``parallel_apply`` starts their threads: it is the one
place that sees all replicas at once, so it makes the per-forward
``ReplicaGroup`` and hands each BatchNorm layer of replica i its handle.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import wrapt
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .forward import EXCLUDED_ATTRIBUTE, SYNC_ATTRIBUTE
from .group import DEFAULT_TIMEOUT, ReplicaGroup, ReplicaHandle

GROUP_ATTRIBUTE = "_autosyncbn_group"

LayerFilter = Callable[[str, nn.Module], bool]
"""``(qualified name, layer) -> True`` to leave that layer unsynchronized."""


class CallbackContext:
    """Shared by the copies of one module across replicas (classic ``sync_batchnorm`` API)."""


def execute_replication_callbacks(replicas: Sequence[nn.Module]) -> None:
    """Call ``__data_parallel_replicate__(ctx, copy_id)`` on every module that defines it.

    The j-th module of every replica shares one context, as in the classic
    ``sync_batchnorm`` package, so third-party modules written for it work.
    """
    if not replicas:
        return
    contexts = [CallbackContext() for _ in replicas[0].modules()]
    for copy_id, replica in enumerate(replicas):
        for index, module in enumerate(replica.modules()):
            callback = getattr(module, "__data_parallel_replicate__", None)
            if callback is not None:
                callback(contexts[index], copy_id)


def _synchronizes(layer: nn.Module, name: str, include_plain: bool,
                  exclude: Optional[LayerFilter]) -> bool:
    from .modules import is_synchronized_class

    if not isinstance(layer, _BatchNorm) or isinstance(layer, nn.SyncBatchNorm):
        return False
    if layer.__dict__.get(EXCLUDED_ATTRIBUTE, False):
        return False
    if exclude is not None and exclude(name, layer):
        return False
    return include_plain or is_synchronized_class(layer)


def _report_when_finished(replica: nn.Module, group: ReplicaGroup, index: int) -> None:
    """Wrap this replica's own ``forward`` so its peers learn when it ends or raises."""
    forward = replica.forward

    @functools.wraps(forward)
    def forward_reporting_end(*args: Any, **kwargs: Any) -> Any:
        group.replica_started(index)
        try:
            output = forward(*args, **kwargs)
        except BaseException as error:
            group.replica_finished(index, error)
            raise
        group.replica_finished(index)
        return output

    # The replica is a fresh object made for this forward only: an instance
    # attribute here never reaches the user's module.
    object.__setattr__(replica, "forward", forward_reporting_end)


def prepare_replicas(
    replicas: Sequence[nn.Module],
    *,
    include_plain: bool,
    exclude: Optional[LayerFilter] = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Optional[ReplicaGroup]:
    """Run replication callbacks and attach one sync group to ``replicas``.

    ``include_plain`` synchronizes plain ``nn.BatchNorm*`` layers too (what
    ``install()`` does); otherwise only ``SynchronizedBatchNorm*`` layers.
    Idempotent: replicas that already have a group are left alone. Returns
    the group when at least one layer synchronizes, else None.
    """
    if not replicas or replicas[0].__dict__.get(GROUP_ATTRIBUTE) is not None:
        return None
    execute_replication_callbacks(replicas)
    group = ReplicaGroup(len(replicas), timeout)
    object.__setattr__(replicas[0], GROUP_ATTRIBUTE, group)  # marks these replicas as prepared
    if len(replicas) < 2:
        return None
    synchronized_any = False
    for index, replica in enumerate(replicas):
        layers = [
            (name or "<root>", layer)
            for name, layer in replica.named_modules()
            if _synchronizes(layer, name, include_plain, exclude)
        ]
        for name, layer in layers:
            object.__setattr__(layer, SYNC_ATTRIBUTE, ReplicaHandle(group, index, name))
        if layers:
            synchronized_any = True
            _report_when_finished(replica, group, index)
    return group if synchronized_any else None


class DataParallelWithCallback(nn.DataParallel):
    """``nn.DataParallel`` whose ``SynchronizedBatchNorm*`` layers share statistics.

    Drop-in for the classic ``sync_batchnorm.DataParallelWithCallback``: after
    the module is replicated, replication callbacks run and every synchronized
    layer is joined to a per-forward sync group. Plain ``nn.BatchNorm*`` layers
    stay per-slice unless ``autosyncbn.install()`` is active.

    Args:
        module (Module): module to be parallelized
        device_ids (list of int or torch.device): CUDA devices (default: all)
        output_device (int or torch.device): where the output goes (default: device_ids[0])
        dim (int): the dimension along which inputs are scattered (default: 0)
        timeout (float): seconds a replica waits for its peers at one BatchNorm
            call (keyword only; default 300)

    Examples::

        >>> model = convert_model(model)            # BatchNorm*d -> SynchronizedBatchNorm*d
        >>> model = DataParallelWithCallback(model, device_ids=[0, 1])
    """

    def __init__(self, module: nn.Module, device_ids: Optional[Sequence[Any]] = None,
                 output_device: Any = None, dim: int = 0, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(module, device_ids, output_device, dim)
        self.sync_timeout = timeout

    def replicate(self, module: nn.Module, device_ids: Sequence[Any]) -> list:
        replicas = super().replicate(module, device_ids)
        prepare_replicas(replicas, include_plain=False,
                         timeout=getattr(self, "sync_timeout", DEFAULT_TIMEOUT))
        return replicas


class _ReplicationCallbackPatch(wrapt.FunctionWrapper):
    """Marks a ``replicate`` already patched, so patching twice is a no-op."""


def patch_replication_callback(data_parallel: nn.DataParallel, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Make an existing ``nn.DataParallel`` instance synchronize ``SynchronizedBatchNorm*`` layers.

    The instance's ``replicate`` is wrapped (the class is untouched). Calling
    it again on the same instance does nothing. ``timeout`` (keyword only) is
    how long a replica waits for its peers at one BatchNorm call.

    Examples::

        >>> model = nn.DataParallel(convert_model(model), device_ids=[0, 1])
        >>> patch_replication_callback(model)
    """
    if not isinstance(data_parallel, nn.DataParallel):
        raise TypeError(
            f"patch_replication_callback expects an nn.DataParallel, got {type(data_parallel).__name__}"
        )
    if isinstance(data_parallel.__dict__.get("replicate"), _ReplicationCallbackPatch):
        return

    def replicate_with_callbacks(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        replicas = wrapped(*args, **kwargs)
        prepare_replicas(replicas, include_plain=False, timeout=timeout)
        return replicas

    patched = _ReplicationCallbackPatch(data_parallel.replicate, replicate_with_callbacks)
    object.__setattr__(data_parallel, "replicate", patched)
