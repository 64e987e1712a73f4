"""Synchronization cost: a training step under emulated DataParallel, synchronized vs not.

A ResNet-style CNN (13 BatchNorm layers) with 2, 4 and 8 CPU replicas in
threads, at two sizes: "small" (16 channels, 32x32, 4 samples per replica),
where per-call overhead dominates, and "medium" (32 channels, 64x64, 2 samples
per replica). Target: <= 1.10x at 4 replicas. Writes results/sync_cost.json.
"""
from __future__ import annotations

import torch

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel
from common import interleaved_medians, resnet_like, training_step, write_json

SIZES = {"small": dict(width=16, image=32, per_replica=4), "medium": dict(width=32, image=64, per_replica=2)}


def main(repeats: int = 12, replica_counts=(2, 4, 8), sizes=("small", "medium")) -> dict:
    torch.manual_seed(0)
    rows: dict = {}
    print("synchronization cost: training step, ResNet-style CNN (13 BatchNorm), emulated replicas")
    for size in sizes:
        config = SIZES[size]
        for replicas in replica_counts:
            model = resnet_like(width=config["width"], blocks=6)
            parallel = EmulatedDataParallel(model, replicas)
            x = torch.randn(config["per_replica"] * replicas, 3, config["image"], config["image"])
            step = training_step(parallel, x)
            medians = interleaved_medians({"unsynchronized": step, "synchronized": step}, repeats,
                                          scopes={"synchronized": autosyncbn.patched})
            ratio = medians["synchronized"] / medians["unsynchronized"]
            rows[f"{size}/{replicas}"] = {"config": config, "replicas": replicas, "medians_s": medians, "ratio": ratio}
            print(f"  {size:<6} {config['width']}ch {config['image']}px, {replicas} replicas x {config['per_replica']}:"
                  f" unsynchronized {medians['unsynchronized'] * 1e3:8.2f} ms"
                  f"   synchronized {medians['synchronized'] * 1e3:8.2f} ms   ratio {ratio:.3f}x"
                  + ("   (target <= 1.10x)" if replicas == 4 else ""))
    result = {"rows": rows, "target_at_4": 1.10}
    write_json("sync_cost", result)
    return result


if __name__ == "__main__":
    main()
