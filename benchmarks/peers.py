"""What autosyncbn is measured against: the meeting floor and the classic algorithm.

- :class:`BarrierBatchNorm2d` only waits at a barrier of all replicas, then
  normalizes its own slice: the cost of meeting at all, the floor any
  synchronized BatchNorm pays on emulated replicas.
- :class:`SplitBarrierBatchNorm2d` is that floor split as a synchronized
  BatchNorm must be: statistics kernel, barrier, normalization kernel.
- :class:`ClassicSyncBatchNorm2d` is the classic ``sync_batchnorm`` algorithm:
  every replica sends the sum and the sum of squares of its slice to replica 0
  through a queue; replica 0 computes the mean and inverse std and sends them
  back; normalization and its backward are composite autograd ops.
- :func:`all_reduce_batch_norm` is the process-group peer in detectron2's
  NaiveSyncBatchNorm style: one differentiable all-reduce of (mean, mean of
  squares) per layer call.

Replica threads are told apart by the names ``autosyncbn.testing`` gives them.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _replica_index() -> int:
    name = threading.current_thread().name
    return int(name.rsplit("-", 1)[1]) if name.startswith("autosyncbn-replica-") else 0


class BarrierBatchNorm2d(nn.BatchNorm2d):
    """Waits for every replica at each call, then normalizes per slice (the floor)."""

    def __init__(self, channels: int, replicas: int) -> None:
        super().__init__(channels)
        self.barrier = threading.Barrier(replicas)  # shared by the replicas (copied by reference)

    def forward(self, x: Tensor) -> Tensor:
        self.barrier.wait(timeout=60)
        return super().forward(x)


class SplitBarrierBatchNorm2d(BarrierBatchNorm2d):
    """The floor in the shape every synchronized BatchNorm has: statistics, the meeting, normalization.

    PyTorch's statistics kernel, the barrier, then its eval-mode kernel with
    those (per-slice) statistics: the same kernels and waits as autosyncbn,
    with no Python around them. The gap between this and autosyncbn is
    autosyncbn's per-call Python (decision, exchange, merge, autograd nodes).
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        self.barrier.wait(timeout=60)
        return torch.batch_norm(x, self.weight, self.bias, mean, var, False, 0.0, self.eps, False)


class _Master:
    """Replica 0's mailbox: sums in from every replica, statistics out to each."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.inbox: queue.Queue = queue.Queue()
        self.outboxes = [queue.Queue() for _ in range(replicas)]


class ClassicSyncBatchNorm2d(nn.BatchNorm2d):
    """Sum and sum of squares gathered by replica 0 through queues, as the classic package does."""

    def __init__(self, channels: int, replicas: int) -> None:
        super().__init__(channels)
        self.master = _Master(replicas)

    def forward(self, x: Tensor) -> Tensor:
        count = x.numel() // x.shape[1]
        total, total_sq = x.sum((0, 2, 3)), x.square().sum((0, 2, 3))
        index = _replica_index()
        master = self.master
        if index != 0:
            master.inbox.put((count, total, total_sq))
            mean, inv_std = master.outboxes[index].get(timeout=60)
        else:
            parts = [(count, total, total_sq)] + [master.inbox.get(timeout=60) for _ in range(master.replicas - 1)]
            size = sum(p[0] for p in parts)
            sum_all = torch.stack([p[1] for p in parts]).sum(0)
            sq_all = torch.stack([p[2] for p in parts]).sum(0)
            mean = sum_all / size
            variance = sq_all / size - mean * mean
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(variance * size / (size - 1), self.momentum)
            inv_std = variance.clamp(min=self.eps).rsqrt()
            for outbox in master.outboxes[1:]:
                outbox.put((mean, inv_std))
        shape = (1, -1, 1, 1)
        return (x - mean.view(shape)) * (inv_std * self.weight).view(shape) + self.bias.view(shape)


def with_batchnorm(model: nn.Module, make: Callable[[int], nn.Module]) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by ``make(channels)``, sharing its parameters."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            replacement = make(child.num_features)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            with_batchnorm(child, make)
    return model


class _AllReduce(torch.autograd.Function):
    """Sum over ranks, differentiable: backward sums the gradients over ranks too."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """detectron2's NaiveSyncBatchNorm style: one all-reduce of (mean, mean of squares) per call."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        channels, world = x.shape[1], dist.get_world_size()
        stats = torch.cat([x.mean((0, 2, 3)), x.square().mean((0, 2, 3))])
        mean, mean_sq = torch.split(_AllReduce.apply(stats) / world, channels)
        var = mean_sq - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        scale = self.weight * (var + self.eps).rsqrt()
        shift = self.bias - mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
