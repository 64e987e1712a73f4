"""Emulated DataParallel on CPU: test multi-GPU training code on a CPU-only CI.

``nn.DataParallel`` on a machine without GPUs does not replicate at all, so
the synchronized path would never run. :class:`EmulatedDataParallel` is an
``nn.DataParallel`` whose N "devices" are all the CPU: the input is split as
DataParallel splits it, the module is replicated by PyTorch's own
``replicate`` (through ``nn.DataParallel.replicate``, where ``autosyncbn.install()``
registers the replicas), and the replicas run each in its own thread with the
caller's grad mode and autocast state carried in, as ``parallel_apply`` runs them.

Also here: :class:`EmulatedDataParallelWithCallback` (the explicit API on CPU
replicas) and :class:`SavedTensorsLedger` (what autograd saves in each replica).
Real processes: ``autosyncbn.processes.run_ranks``; fixtures for pytest:
``autosyncbn.tools.pytest_plugin``.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Mapping
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..parallel import DataParallelWithCallback
from ..private_api import BROADCAST_SEAM, ExceptionWrapper, missing
from ..replicas import reraise_replica_error, warn_unregistered
from ..settings import DEFAULT_TIMEOUT, checked_timeout
from ..wrapping import Patch, SharedPatches

__all__ = [
    "EmulatedDataParallel",
    "EmulatedDataParallelWithCallback",
    "SavedTensorsLedger",
    "cpu_replicate",
    "emulated_data_parallel",
    "split_like_data_parallel",
]

_replicate_module = sys.modules["torch.nn.parallel.replicate"]
_emulating = threading.local()


def _cpu_broadcast(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``_broadcast_coalesced_reshape`` for CPU "devices", in emulating threads only.

    With ``detach`` (buffers), replica 0 gets the source tensors themselves, as
    a real broadcast does for the source device, and the others get copies.
    Without it (parameters), every replica gets a copy that stays in the
    autograd graph, so gradients flow back to the parameters.
    """
    if not getattr(_emulating, "active", False):
        return wrapped(*args, **kwargs)

    def broadcast(tensors: Sequence[torch.Tensor], devices: Sequence[Any], detach: bool = False) -> list:
        if not tensors:
            return []
        if detach:
            return [list(tensors)] + [[t.detach().clone() for t in tensors] for _ in devices[1:]]
        flat = _BroadcastOnCpu.apply(len(devices), *tensors)
        return [list(flat[i:i + len(tensors)]) for i in range(0, len(flat), len(tensors))]

    return broadcast(*args, **kwargs)


class _BroadcastOnCpu(torch.autograd.Function):
    """CPU twin of DataParallel's ``Broadcast``: copies forward, sums in replica order backward.

    One node for all replicas, like ``Broadcast``/``ReduceAddCoalesced``, so
    parameter gradients are summed in a fixed order whatever order the replica
    threads ran in: emulated training is reproducible run to run.
    """

    @staticmethod
    def forward(ctx: Any, replicas: int, *tensors: torch.Tensor) -> tuple:
        ctx.count = len(tensors)
        return tuple(t.clone() for _ in range(replicas) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:
        count = ctx.count
        sums = []
        for index in range(count):
            total = None
            for grad in grads[index::count]:
                if grad is not None:
                    total = grad.clone() if total is None else total.add_(grad)
            sums.append(total)
        return (None, *sums)


def _broadcast_seam() -> str:
    """The name of replicate's copying function, checked when the first emulated replicas are made."""
    if not hasattr(_replicate_module, BROADCAST_SEAM):
        raise missing(f"torch.nn.parallel.replicate.{BROADCAST_SEAM}", "Emulating DataParallel replicas on the CPU")
    return BROADCAST_SEAM


_BROADCAST_SEAM = SharedPatches(lambda: [
    Patch(_replicate_module, _broadcast_seam(), wrapper=_cpu_broadcast)
])


@contextlib.contextmanager
def _cpu_replication() -> Iterator[None]:
    """Route PyTorch's ``replicate`` to CPU copies for this thread, for the block only."""
    _BROADCAST_SEAM.acquire()
    _emulating.active = True
    try:
        yield
    finally:
        _emulating.active = False
        _BROADCAST_SEAM.release()


def cpu_replicate(module: nn.Module, num_replicas: int, detach: bool = False) -> list:
    """PyTorch's ``replicate`` logic, with every replica on the CPU."""
    with _cpu_replication():
        return _replicate_module.replicate(module, list(range(num_replicas)), detach)


def split_like_data_parallel(obj: Any, num_replicas: int, dim: int = 0) -> list:
    """Split ``obj`` as ``scatter`` does: tensors chunked along ``dim``, containers recursed.

    A batch of B samples gives ``min(B, num_replicas)`` parts sized like
    ``torch.chunk`` (the last part may be smaller), exactly as DataParallel does.
    """
    if isinstance(obj, torch.Tensor):
        return list(obj.chunk(num_replicas, dim))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return [type(obj)(*args) for args in zip(*(split_like_data_parallel(o, num_replicas, dim) for o in obj))]
    if isinstance(obj, tuple) and obj:
        return list(zip(*(split_like_data_parallel(o, num_replicas, dim) for o in obj)))
    if isinstance(obj, list) and obj:
        return [list(parts) for parts in zip(*(split_like_data_parallel(o, num_replicas, dim) for o in obj))]
    if isinstance(obj, dict) and obj:
        return [type(obj)(parts) for parts in zip(*(
            [(key, part) for part in split_like_data_parallel(value, num_replicas, dim)]
            for key, value in obj.items()
        ))]
    return [obj for _ in range(num_replicas)]


def _gather(outputs: Sequence[Any], dim: int) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if all(t.dim() == 0 for t in outputs):
            return torch.stack(list(outputs))
        return torch.cat(list(outputs), dim)
    if first is None:
        return None
    if isinstance(first, Mapping):
        return type(first)((key, _gather([o[key] for o in outputs], dim)) for key in first)  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)._make(_gather(parts, dim) for parts in zip(*outputs))  # type: ignore[attr-defined]
    return type(first)(_gather(parts, dim) for parts in zip(*outputs))


class EmulatedDataParallel(nn.DataParallel):
    """``nn.DataParallel`` with ``num_replicas`` CPU replicas, each run in its own thread.

    Behaves like DataParallel on ``num_replicas`` GPUs: same split of the
    batch (fewer replicas when the batch is smaller), same replication code,
    one thread per replica, outputs concatenated along ``dim``.

    The replicas share the cores instead of each using them all: with
    PyTorch's OpenMP backend each replica thread runs its forward with
    ``torch.get_num_threads() // N`` intra-op threads (at least 1), where N
    counts the replica threads of every emulated forward running when it starts.
    ``torch.set_num_threads`` is partly process-wide, so while any emulated
    forward runs, threads started meanwhile and MKL see the smaller value too;
    the value from before comes back when the last one ends, also when it
    raises. Backward runs in the caller's thread, with the whole pool. An op
    whose result depends on the thread count (PyTorch's own BatchNorm1d on
    (N, C) inputs, for one) can differ in the last bit from the same op run in
    the caller: compare with a tolerance, or run the reference the same way.

    Args:
        module (Module): the module to replicate (on the CPU)
        num_replicas (int): how many devices to emulate. Default: 2
        dim (int): the dimension along which inputs are split. Default: 0

    Examples::

        >>> autosyncbn.install()
        >>> model = EmulatedDataParallel(net, num_replicas=4)
        >>> loss = model(x).square().mean(); loss.backward()
    """

    def __init__(self, module: nn.Module, num_replicas: int = 2, dim: int = 0) -> None:
        nn.Module.__init__(self)
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int):
            raise TypeError(f"num_replicas must be an int, got {type(num_replicas).__name__}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        self.module = module
        self.device_ids = list(range(num_replicas))
        self.output_device = 0
        self.dim = dim
        self.src_device_obj = torch.device("cpu")

    def replicate(self, module: nn.Module, device_ids: Sequence[Any]) -> list:
        with _cpu_replication():
            return super().replicate(module, device_ids)

    def scatter(self, inputs: tuple, kwargs: Any, device_ids: Sequence[Any]) -> tuple:
        count = len(device_ids)
        scattered = split_like_data_parallel(inputs, count, self.dim) if inputs else []
        scattered_kwargs = split_like_data_parallel(kwargs, count, self.dim) if kwargs else []
        if len(scattered) < len(scattered_kwargs):
            scattered.extend(() for _ in range(len(scattered_kwargs) - len(scattered)))
        elif len(scattered_kwargs) < len(scattered):
            scattered_kwargs.extend({} for _ in range(len(scattered) - len(scattered_kwargs)))
        return tuple(tuple(part) for part in scattered), tuple(scattered_kwargs)

    def parallel_apply(self, replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any) -> list:
        return _parallel_apply_on_cpu(replicas, inputs, kwargs)

    def gather(self, outputs: Sequence[Any], output_device: Any) -> Any:
        return _gather(outputs, self.dim)


class EmulatedDataParallelWithCallback(EmulatedDataParallel, DataParallelWithCallback):
    """:class:`autosyncbn.DataParallelWithCallback` on ``num_replicas`` CPU replicas.

    The explicit API without GPUs: ``SynchronizedBatchNorm*`` layers
    synchronize (and replication callbacks run) without ``install()``; plain
    ``nn.BatchNorm*`` layers stay per slice unless ``install()`` is active.

    Args:
        module (Module): the module to replicate (on the CPU)
        num_replicas (int): how many devices to emulate. Default: 2
        dim (int): the dimension along which inputs are split. Default: 0
        timeout (float): seconds a replica waits for its peers at one
            BatchNorm call (keyword only). Default: 300

    Examples::

        >>> model = EmulatedDataParallelWithCallback(convert_model(net), num_replicas=4)
    """

    def __init__(self, module: nn.Module, num_replicas: int = 2, dim: int = 0, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(module, num_replicas, dim)
        self.sync_timeout = checked_timeout(timeout)


def emulated_data_parallel(module: nn.Module, inputs: Any, num_replicas: int = 2, dim: int = 0,
                           module_kwargs: Any = None) -> Any:
    """Functional form, like ``torch.nn.parallel.data_parallel``: ``module(inputs)`` on CPU replicas.

    Examples::

        >>> out = emulated_data_parallel(model, x, num_replicas=4)
    """
    if not isinstance(inputs, tuple):
        inputs = (inputs,) if inputs is not None else ()
    return EmulatedDataParallel(module, num_replicas, dim)(*inputs, **(module_kwargs or {}))


@functools.lru_cache(maxsize=None)
def _openmp_backend() -> bool:
    """Whether each thread running an op gets its own OpenMP team (a native thread pool is shared anyway)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


_threads_lock = threading.Lock()
_replicas_running = 0  # replica threads of emulated forwards now running, all callers together
_threads_before = 0  # torch.get_num_threads() before the first of them started


@contextlib.contextmanager
def _intra_op_threads_shared(replicas: int) -> Iterator[int]:
    """Yield how many intra-op threads each of ``replicas`` new replica threads may use.

    With OpenMP every thread that runs an op gets a team of
    ``torch.get_num_threads()``, so N replica threads would run N times as many
    threads as there are cores. ``torch.set_num_threads`` in a replica thread
    bounds that thread's team, and also sets a process-wide value (which new
    threads and MKL read): the value from before is put back when the last
    emulated forward running in the process ends, however it ends.
    """
    global _replicas_running, _threads_before
    torch.get_num_threads()  # pin the caller's own team size before the process-wide value changes
    with _threads_lock:
        if _replicas_running == 0:
            _threads_before = torch.get_num_threads()
        _replicas_running += replicas
        share = max(1, _threads_before // _replicas_running)
    try:
        yield share
    finally:
        with _threads_lock:
            _replicas_running -= replicas
            if _replicas_running == 0:
                torch.set_num_threads(_threads_before)


def _parallel_apply_on_cpu(replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Sequence[dict]) -> list:
    """One thread per replica, as ``torch.nn.parallel.parallel_apply`` runs them (and as
    autosyncbn's patch of it: replicas not made by ``replicate`` are warned about)."""
    warn_unregistered(replicas)
    results: dict[int, Any] = {}
    grad_enabled = torch.is_grad_enabled()
    autocast_enabled = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def worker(index: int, replica: nn.Module, args: Any, kw: dict, threads: Optional[int] = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(grad_enabled)
        try:
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_enabled):
                if not isinstance(args, (list, tuple)):
                    args = (args,)
                results[index] = replica(*args, **kw)
        except Exception:
            results[index] = ExceptionWrapper(where=f"in replica {index} on device cpu")

    if len(replicas) > 1:
        bounded = _intra_op_threads_shared(len(replicas)) if _openmp_backend() else contextlib.nullcontext()
        with bounded as threads:
            workers = [
                threading.Thread(target=worker, args=(i, r, a, k, threads), name=f"autosyncbn-replica-{i}")
                for i, (r, a, k) in enumerate(zip(replicas, inputs, kwargs))
            ]
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join()
    else:
        worker(0, replicas[0], inputs[0], kwargs[0])
    outputs = []
    for index in range(len(replicas)):
        output = results[index]
        if isinstance(output, ExceptionWrapper):
            try:
                output.reraise()
            except BaseException as error:  # as autosyncbn's patch of parallel_apply does
                reraise_replica_error(replicas, error)
        outputs.append(output)
    return outputs


class SavedTensorsLedger(nn.Module):
    """Wraps a module and records what autograd saves for backward in each replica's thread.

    ``saved_tensors_hooks`` are thread-local, so they are entered inside the
    wrapped module's forward, in the replica's own thread. ``records`` holds
    one ``(data pointer, bytes)`` per pack: a tensor saved twice is counted twice.

    Examples::

        >>> ledger = SavedTensorsLedger(nn.BatchNorm2d(16))
        >>> EmulatedDataParallel(ledger, 4)(x).sum().backward()
        >>> ledger.saved_bytes()
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.records: list = []
        self._lock = threading.Lock()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            with self._lock:
                self.records.append((tensor.data_ptr(), tensor.numel() * tensor.element_size()))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return self.inner(*args, **kwargs)

    def saved_bytes(self, larger_than: int = 0) -> int:
        """Bytes packed (every pack counted), of the tensors larger than ``larger_than`` bytes."""
        return sum(size for _, size in self.records if size > larger_than)
