"""The explicit API's DataParallel: ``DataParallelWithCallback`` and ``patch_replication_callback``.

Both act at ``replicate``, as the classic ``sync_batchnorm`` package does: the
replicas are registered there (``replicas.register``) with a plan that
synchronizes autosyncbn's own layers (plain ``nn.BatchNorm*d`` stays per slice,
with a warning, unless ``install()`` is active, which synchronizes every kind),
and the classic replication callbacks run there. So a DataParallel that runs
its replicas with code of its own synchronizes too.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from .replicas import ReplicaPlan, register
from .settings import DEFAULT_TIMEOUT, checked_timeout
from .wrapping import Patch


def explicit_plan(timeout: float) -> ReplicaPlan:
    """The explicit API's plan: autosyncbn's own layers synchronize, plain ones stay per slice."""
    return ReplicaPlan(checked_timeout(timeout), include_plain=False)


class DataParallelWithCallback(nn.DataParallel):
    """``nn.DataParallel`` whose ``SynchronizedBatchNorm*`` layers share statistics.

    Drop-in for the classic ``sync_batchnorm.DataParallelWithCallback``: when
    the replicas of each forward are made, replication callbacks run and every
    replica joins that forward's sync group, whoever runs it. Plain
    ``nn.BatchNorm*`` layers stay per slice (with a warning) unless
    ``autosyncbn.install()`` is active.

    Args:
        module (Module): module to be parallelized
        device_ids (list of int or torch.device): CUDA devices (default: all)
        output_device (int or torch.device): where the output goes (default: device_ids[0])
        dim (int): the dimension along which inputs are scattered (default: 0)
        timeout (float): seconds a replica waits for its peers at one BatchNorm
            call (keyword only; default 300; a positive, finite number)

    Examples::

        >>> model = convert_model(model)            # BatchNorm*d -> SynchronizedBatchNorm*d
        >>> model = DataParallelWithCallback(model, device_ids=[0, 1])
    """

    def __init__(self, module: nn.Module, device_ids: Optional[Sequence[Any]] = None,
                 output_device: Any = None, dim: int = 0, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        timeout = checked_timeout(timeout)
        super().__init__(module, device_ids, output_device, dim)
        self.sync_timeout = timeout

    def replicate(self, module: nn.Module, device_ids: Sequence[Any]) -> list:
        replicas = super().replicate(module, device_ids)
        register(replicas, explicit_plan(getattr(self, "sync_timeout", DEFAULT_TIMEOUT)), module)
        return replicas


class _ReplicateWithCallback:
    """A patched instance's ``replicate``: its class's ``replicate``, then registration.

    It refers to its own DataParallel, so a deep copy of that DataParallel
    gets a copy of this that drives the copy (EMA helpers deep-copy the model).
    """

    def __init__(self, data_parallel: nn.DataParallel, timeout: float) -> None:
        self.data_parallel = data_parallel
        self.plan = explicit_plan(timeout)

    def __call__(self, module: nn.Module, device_ids: Sequence[Any]) -> list:
        replicas = type(self.data_parallel).replicate(self.data_parallel, module, device_ids)
        register(replicas, self.plan, module)
        return replicas


_PATCH_ATTRIBUTE = "_autosyncbn_replication_patch"


def patch_replication_callback(data_parallel: nn.DataParallel, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Make an existing ``nn.DataParallel`` instance synchronize ``SynchronizedBatchNorm*`` layers.

    The instance's ``replicate`` is patched (the class is untouched), as the
    classic package does. Calling it again on the same instance only updates
    ``timeout`` (keyword only): how long a replica waits for its peers at one
    BatchNorm call.

    Examples::

        >>> model = nn.DataParallel(convert_model(model), device_ids=[0, 1])
        >>> patch_replication_callback(model)
    """
    if not isinstance(data_parallel, nn.DataParallel):
        raise TypeError(
            f"patch_replication_callback expects an nn.DataParallel, got {type(data_parallel).__name__}"
        )
    previous = data_parallel.__dict__.get(_PATCH_ATTRIBUTE)
    if previous is not None:
        previous.restore()
    patch = Patch(data_parallel, "replicate", replacement=_ReplicateWithCallback(data_parallel, timeout))
    patch.apply()
    data_parallel.__dict__[_PATCH_ATTRIBUTE] = patch
