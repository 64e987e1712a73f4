"""Where the time of one synchronized BatchNorm call goes (one thread, no waiting).

Per call, on one replica's slice of the "small" size of bench_sync_cost.py
(4 x 16 x 32 x 32), in microseconds:

- ``nn.BatchNorm, fwd+bwd``: PyTorch's fused training kernels;
- ``autosyncbn, one part, fwd+bwd``: this slice's moments, a merge of one and
  the layer call's node (normalization, then its backward);
- ``part's moments``: what each replica does before the meeting (PyTorch's
  statistics kernel and a float64 sum for the mean);
- ``merge of 4 parts``: what the last replica to arrive does for a layer call
  of 4 replicas while the others wait (Chan's merge and the layer call's
  node); each replica then fills its own output (``then one part filled``).

The counts beside these times are in count_calls.py. Writes results/profile.json.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from autosyncbn import functional
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
    layer = nn.BatchNorm2d(16)
    parts = [torch.randn(4, 16, 32, 32, requires_grad=True) for _ in range(4)]
    grad = torch.randn_like(parts[0])
    moments = [local_moments(part) for part in parts]
    count = parts[0].numel() // 16

    def pytorch() -> None:
        layer(parts[0]).backward(grad)

    def one_part() -> None:
        call, (out,) = functional.merge_parts([count], [local_moments(parts[0])], 1e-5, parts[:1], [layer.weight],
                                              [layer.bias])
        functional.normalize_part(call, out, parts[0], layer.weight, layer.bias).backward(grad)

    def merge_of_four() -> None:
        functional.merge_parts([count] * 4, moments, 1e-5, parts, [layer.weight] * 4, [layer.bias] * 4)

    def normalize_one_part() -> None:
        call, outputs = functional.merge_parts([count] * 4, moments, 1e-5, parts, [layer.weight] * 4,
                                               [layer.bias] * 4)
        functional.normalize_part(call, outputs[0], parts[0], layer.weight, layer.bias)

    figures = {"nn.BatchNorm, fwd+bwd": per_call_us(pytorch), "autosyncbn, one part, fwd+bwd": per_call_us(one_part),
               "part's moments": per_call_us(lambda: local_moments(parts[0])),
               "merge of 4 parts (the node)": per_call_us(merge_of_four),
               "the same, then one part filled": per_call_us(normalize_one_part)}
    print("one synchronized BatchNorm call, one thread (us):")
    for name, value in figures.items():
        print(f"  {name:<32} {value:8.1f}")
    write_json("profile", {"per_call_us": figures})
    return figures


if __name__ == "__main__":
    main()
