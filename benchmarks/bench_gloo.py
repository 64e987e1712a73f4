"""Processes: a DDP training step over gloo, 2 processes, beside a peer and the collective floor.

All models are DistributedDataParallel around the same ResNet-style CNN (13
BatchNorm layers); steps of every variant alternate inside the same
processes (``common.interleaved_medians``):

- ``local``: nn.BatchNorm, per-process statistics (the baseline);
- ``autosyncbn``: ``autosyncbn.convert_model`` (one all-gather per layer call
  forward, one backward);
- ``all-reduce peer``: detectron2's NaiveSyncBatchNorm style, one
  differentiable all-reduce per layer call (``peers.AllReduceBatchNorm2d``).

The collective floor is what the collectives alone cost: layer calls x 2
(forward and backward) x the measured latency of one all-gather of
autosyncbn's record. Writes results/gloo.json.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autosyncbn  # noqa: E402
from autosyncbn.distributed import FIRST_CHANNELS, HEADER  # noqa: E402
from autosyncbn.processes import run_ranks  # noqa: E402
from common import interleaved_medians, ranks_in_step, resnet_like, training_step, write_json  # noqa: E402
from peers import AllReduceBatchNorm2d, with_batchnorm  # noqa: E402

SIZE = dict(width=32, image=64, per_rank=2)
LAYER_CALLS = 13


def _collective_latency(repeats: int = 50) -> float:
    record = torch.zeros(HEADER + 2 * FIRST_CHANNELS, dtype=torch.float64)
    out = torch.empty(dist.get_world_size() * record.numel(), dtype=torch.float64)
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # as distributed.py
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        gather_into(out, record)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _rank(rank: int, world: int, repeats: int) -> dict:
    torch.manual_seed(0)
    base = resnet_like(width=SIZE["width"], blocks=6)
    models = {
        "local": nn.parallel.DistributedDataParallel(copy.deepcopy(base)),
        "autosyncbn": nn.parallel.DistributedDataParallel(autosyncbn.convert_model(copy.deepcopy(base))),
        "all-reduce peer": nn.parallel.DistributedDataParallel(
            with_batchnorm(copy.deepcopy(base), AllReduceBatchNorm2d)),
    }
    x = torch.randn(SIZE["per_rank"], 3, SIZE["image"], SIZE["image"])
    medians = interleaved_medians({name: training_step(m, x) for name, m in models.items()}, repeats,
                                  warmup=2, scopes={name: ranks_in_step for name in models})
    return {"medians_s": medians, "collective_s": _collective_latency()}


def main(repeats: int = 12, world: int = 2) -> dict:
    measured = run_ranks(_rank, world, repeats, deadline=600, pg_timeout=120)[0]
    medians, latency = measured["medians_s"], measured["collective_s"]
    local = medians["local"]
    floor = (local + LAYER_CALLS * 2 * latency) / local
    ratios = {name: value / local for name, value in medians.items()}
    print(f"processes: DDP training step over gloo, {world} processes x {SIZE['per_rank']} samples,"
          f" ResNet-style CNN ({SIZE['width']}ch, {SIZE['image']}px, {LAYER_CALLS} BatchNorm)")
    print(f"  local {local * 1e3:7.2f} ms   autosyncbn {ratios['autosyncbn']:.3f}x"
          f"   all-reduce peer {ratios['all-reduce peer']:.3f}x   collective floor {floor:.3f}x"
          f" ({LAYER_CALLS} x 2 x {latency * 1e6:.0f} us)")
    result = {"medians_s": medians, "ratios": ratios, "ratio": ratios["autosyncbn"],
              "collective_latency_s": latency, "floor": floor, "size": SIZE, "world": world}
    write_json("gloo", result)
    return result


if __name__ == "__main__":
    main()
