"""Processes: a DDP training step over gloo with 2 processes, synchronized vs local BatchNorm.

Both models are DistributedDataParallel; one keeps nn.BatchNorm (per-process
statistics), the other is autosyncbn.convert_model'd. Steps alternate inside
the same processes. Target: <= 1.25x. Writes results/gloo.json.
"""
from __future__ import annotations

import datetime
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autosyncbn  # noqa: E402
from common import resnet_like, write_json  # noqa: E402

SIZE = dict(width=32, image=64, per_rank=2)


def _rank(rank: int, world: int, init_file: str, repeats: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    base = resnet_like(width=SIZE["width"], blocks=6)
    models = {
        "local": nn.parallel.DistributedDataParallel(base),
        "synchronized": nn.parallel.DistributedDataParallel(autosyncbn.convert_model(resnet_like(width=SIZE["width"], blocks=6))),
    }
    x = torch.randn(SIZE["per_rank"], 3, SIZE["image"], SIZE["image"])
    times: dict = {name: [] for name in models}
    for round_ in range(repeats + 2):
        for name, model in models.items():
            dist.barrier()
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            elapsed = time.perf_counter() - start
            if round_ >= 2:
                times[name].append(elapsed)
    if rank == 0:
        queue.put({name: statistics.median(values) for name, values in times.items()})
    del models
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main(repeats: int = 12, world: int = 2) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        processes = [context.Process(target=_rank, args=(r, world, os.path.join(folder, "rdv"), repeats, queue))
                     for r in range(world)]
        for process in processes:
            process.start()
        medians = queue.get(timeout=600)
        for process in processes:
            process.join(60)
    ratio = medians["synchronized"] / medians["local"]
    print(f"processes: DDP training step over gloo, {world} processes x {SIZE['per_rank']} samples,"
          f" ResNet-style CNN ({SIZE['width']}ch, {SIZE['image']}px, 13 BatchNorm)")
    print(f"  local BatchNorm {medians['local'] * 1e3:8.2f} ms   synchronized {medians['synchronized'] * 1e3:8.2f} ms"
          f"   ratio {ratio:.3f}x   (target <= 1.25x)")
    result = {"medians_s": medians, "ratio": ratio, "target": 1.25, "size": SIZE, "world": world}
    write_json("gloo", result)
    return result


if __name__ == "__main__":
    main()
