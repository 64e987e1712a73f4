"""Where the time of one synchronized BatchNorm call goes (one thread, no waiting).

Per call, forward + backward, on one replica's slice of the "small" size of
bench_sync_cost.py (4 x 16 x 32 x 32):

- ``nn.BatchNorm``: PyTorch's fused training kernels;
- ``autosyncbn, one part``: autosyncbn's path for one slice merged with no
  peers (local moments, a merge of one, the merge node, ``_Normalize``);
- ``merge of 4``: what the last replica to arrive does for a layer call of
  4 replicas while the others wait (the Chan merge and the merge node);
- ``decision``: finding the owning module and deciding the route.

The gap between the first two, times 4 replicas, plus the merge, is what a
synchronized step adds per layer call on top of the meeting itself (the
floor in bench_sync_cost.py). In 4 contending replica threads each small op
and each Python step costs several times its single-thread figure here.
Prints microseconds; writes results/profile.json.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import nn

from autosyncbn import dispatch, functional
from autosyncbn.context import ReplicaContext, ReplicaPlan, entered
from autosyncbn.group import ReplicaGroup
from autosyncbn.moments import local_moments
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
    parts = [torch.randn(4, 16, 32, 32, requires_grad=True) for _ in range(4)]
    moments = [local_moments(part) for part in parts]

    def pytorch() -> None:
        layer(x).backward(grad)

    def alone(input: torch.Tensor, weight: Optional[torch.Tensor], count: int,
              moments: tuple[torch.Tensor, torch.Tensor], eps: float) -> functional.Share:
        """An exchange with no peers: this slice merged alone."""
        return functional.merge_parts([count], [moments], [input], [weight], eps)[0]

    def ours() -> None:
        out, _ = functional.sync_batch_norm(x, layer.weight, layer.bias, 1e-5, alone)
        out.backward(grad)

    def merge() -> None:
        functional.merge_parts([4096] * 4, moments, parts, [layer.weight] * 4, 1e-5)

    context = ReplicaContext(ReplicaGroup(4, 10.0), 0, layer, ReplicaPlan(10.0, include_plain=True))

    def decision() -> None:
        with entered(context):
            dispatch.decide(x, layer, False, None, context, None)

    figures = {"nn.BatchNorm": per_call_us(pytorch), "autosyncbn, one part": per_call_us(ours),
               "merge of 4": per_call_us(merge), "decision": per_call_us(decision)}
    print("one synchronized BatchNorm call, forward + backward, one thread (us):")
    for name, value in figures.items():
        print(f"  {name:<22} {value:8.1f}")
    write_json("profile", {"per_call_us": figures})
    return figures


if __name__ == "__main__":
    main()
