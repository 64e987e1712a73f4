"""Synchronization cost: a training step under emulated DataParallel, synchronized vs not.

A ResNet-style CNN (13 BatchNorm layers), 2, 4 and 8 CPU replicas in threads.
Target: <= 1.10x at 4 replicas. Writes results/sync_cost.json.
"""
from __future__ import annotations

import torch

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel
from common import interleaved_medians, resnet_like, training_step, write_json


def main(repeats: int = 15, replica_counts=(2, 4, 8)) -> dict:
    torch.manual_seed(0)
    rows = {}
    print("synchronization cost: training step, ResNet-style CNN (13 BatchNorm), emulated replicas")
    for replicas in replica_counts:
        model = resnet_like(width=16, blocks=6)
        parallel = EmulatedDataParallel(model, replicas)
        step = training_step(parallel, torch.randn(4 * replicas, 3, 32, 32))
        medians = interleaved_medians({"unsynchronized": step, "synchronized": step}, repeats,
                                      scopes={"synchronized": autosyncbn.patched})
        ratio = medians["synchronized"] / medians["unsynchronized"]
        rows[replicas] = {"medians_s": medians, "ratio": ratio}
        print(f"  {replicas} replicas x 4 samples: unsynchronized {medians['unsynchronized'] * 1e3:7.2f} ms"
              f"   synchronized {medians['synchronized'] * 1e3:7.2f} ms   ratio {ratio:.3f}x"
              + ("   (target <= 1.10x)" if replicas == 4 else ""))
    result = {"by_replicas": rows, "target_at_4": 1.10}
    write_json("sync_cost", result)
    return result


if __name__ == "__main__":
    main()
