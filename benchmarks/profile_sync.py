"""Where the time of one synchronized BatchNorm call goes (one thread, no waiting).

Per call, forward + backward, on one replica's slice of the "small" size of
bench_sync_cost.py (4 x 16 x 32 x 32):

- ``nn.BatchNorm``: PyTorch's fused training kernels;
- ``autosyncbn, no peers``: autosyncbn's three autograd Functions with an
  exchange that returns this slice's own moments (no threads, no merge);
- ``merge of 4``: the one merge node of a call, forward and backward;
- ``decision``: finding the owning module and deciding the route.

The gap between the first two, times 4 replicas, plus the merge, is what a
synchronized step adds per layer call on top of the meeting itself (the
floor in bench_sync_cost.py). Prints microseconds; writes results/profile.json.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from autosyncbn import dispatch, functional
from autosyncbn.context import ReplicaContext, ReplicaPlan, entered
from autosyncbn.group import ReplicaGroup
from common import write_json


def per_call_us(run: Callable[[], None], repeats: int = 300) -> float:
    for _ in range(20):
        run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    grad = torch.randn_like(x)
    layer = nn.BatchNorm2d(16)
    moments = [torch.rand(2, 16, requires_grad=True) for _ in range(4)]
    merge_grads = [torch.randn(2, 16) for _ in range(4)]

    def pytorch() -> None:
        layer(x).backward(grad)

    def ours() -> None:
        out, _, _ = functional.sync_batch_norm(x, layer.weight, layer.bias, 1e-5,
                                               lambda count, m: (m, 4 * count))
        out.backward(grad)

    def merge() -> None:
        torch.autograd.backward(functional.merge_replica_moments([4096] * 4, moments), merge_grads)

    context = ReplicaContext(ReplicaGroup(4, 10.0), 0, layer, ReplicaPlan(10.0, include_plain=True))

    def decision() -> None:
        with entered(context):
            dispatch.decide(x, layer, False, None, context, None)

    figures = {"nn.BatchNorm": per_call_us(pytorch), "autosyncbn, no peers": per_call_us(ours),
               "merge of 4": per_call_us(merge), "decision": per_call_us(decision)}
    print("one synchronized BatchNorm call, forward + backward, one thread (us):")
    for name, value in figures.items():
        print(f"  {name:<22} {value:8.1f}")
    write_json("profile", {"per_call_us": figures})
    return figures


if __name__ == "__main__":
    main()
