"""The explicit API's DataParallel: ``DataParallelWithCallback`` and ``patch_replication_callback``.

Both run each forward through ``replicas.run_parallel`` with a plan that
synchronizes autosyncbn's own layers (plain ``nn.BatchNorm*d`` stays per
slice unless ``install()`` is active, which synchronizes every kind), and
run the classic replication callbacks, as the classic ``sync_batchnorm``
package does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from torch import nn

from .context import ReplicaPlan
from .replicas import run_parallel
from .settings import DEFAULT_TIMEOUT, checked_timeout
from .wrapping import Patch


def explicit_plan(timeout: float) -> ReplicaPlan:
    """The explicit API's plan: autosyncbn's own layers synchronize, plain ones stay per slice."""
    return ReplicaPlan(checked_timeout(timeout), include_plain=False)


class DataParallelWithCallback(nn.DataParallel):
    """``nn.DataParallel`` whose ``SynchronizedBatchNorm*`` layers share statistics.

    Drop-in for the classic ``sync_batchnorm.DataParallelWithCallback``: before
    the replicas of each forward run, replication callbacks run and every
    synchronized layer joins that forward's sync group. Plain ``nn.BatchNorm*``
    layers stay per slice unless ``autosyncbn.install()`` is active.

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

    def parallel_apply(self, replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any) -> list:
        plan = explicit_plan(getattr(self, "sync_timeout", DEFAULT_TIMEOUT))
        return run_parallel(replicas, lambda calls: super(DataParallelWithCallback, self).parallel_apply(
            calls, inputs, kwargs), explicit_plan=plan)


def _replication_callback_patch(data_parallel: nn.DataParallel, timeout: float) -> Patch:
    plan = explicit_plan(timeout)

    def parallel_apply_with_callbacks(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        replicas, rest = args[0], args[1:]
        return run_parallel(replicas, lambda calls: wrapped(calls, *rest, **kwargs), explicit_plan=plan)

    return Patch(data_parallel, "parallel_apply", wrapper=parallel_apply_with_callbacks)


_PATCH_ATTRIBUTE = "_autosyncbn_replication_patch"


def patch_replication_callback(data_parallel: nn.DataParallel, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Make an existing ``nn.DataParallel`` instance synchronize ``SynchronizedBatchNorm*`` layers.

    The instance's ``parallel_apply`` is wrapped (the class is untouched).
    Calling it again on the same instance only updates ``timeout`` (keyword
    only): how long a replica waits for its peers at one BatchNorm call.

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
    patch = _replication_callback_patch(data_parallel, timeout)
    patch.apply()
    data_parallel.__dict__[_PATCH_ATTRIBUTE] = patch
