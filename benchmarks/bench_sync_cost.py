"""Synchronization cost: a training step under emulated DataParallel, beside its floor and a peer.

A ResNet-style CNN (13 BatchNorm layers) with 2, 4 and 8 CPU replicas in
threads, at two sizes: "small" (16 channels, 32x32, 4 samples per replica),
where per-call costs dominate, and "medium" (32 channels, 64x64, 2 samples per
replica). Four variants run interleaved in one process, each relative to the
unsynchronized step:

- ``autosyncbn``: the plain model under ``autosyncbn.patched()``;
- ``floor``: BatchNorm that only waits at a barrier of all replicas;
- ``classic``: the classic sync_batchnorm algorithm (sums through queues).

Targets at 4 replicas: autosyncbn <= floor + 0.05x, and >= 15% faster than
classic. Writes results/sync_cost.json.
"""
from __future__ import annotations

import copy
import functools

import torch

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel
from common import interleaved_medians, resnet_like, training_step, write_json
from peers import BarrierBatchNorm2d, ClassicSyncBatchNorm2d, with_batchnorm

SIZES = {"small": dict(width=16, image=32, per_replica=4), "medium": dict(width=32, image=64, per_replica=2)}


def variants(model: torch.nn.Module, replicas: int) -> dict:
    """The four steps to time, each on its own copy of the same model."""
    def parallel(make=None):
        copy_ = copy.deepcopy(model)
        return EmulatedDataParallel(with_batchnorm(copy_, make) if make else copy_, replicas)

    return {
        "unsynchronized": parallel(),
        "autosyncbn": parallel(),
        "floor": parallel(functools.partial(BarrierBatchNorm2d, replicas=replicas)),
        "classic": parallel(functools.partial(ClassicSyncBatchNorm2d, replicas=replicas)),
    }


def main(repeats: int = 20, replica_counts=(2, 4, 8), sizes=("small", "medium")) -> dict:
    torch.manual_seed(0)
    rows: dict = {}
    print("synchronization cost: training step, ResNet-style CNN (13 BatchNorm), emulated replicas;"
          " ratios to the unsynchronized step")
    for size in sizes:
        config = SIZES[size]
        for replicas in replica_counts:
            x = torch.randn(config["per_replica"] * replicas, 3, config["image"], config["image"])
            models = variants(resnet_like(width=config["width"], blocks=6), replicas)
            medians = interleaved_medians({name: training_step(m, x) for name, m in models.items()}, repeats,
                                          scopes={"autosyncbn": autosyncbn.patched})
            ratios = {name: medians[name] / medians["unsynchronized"] for name in medians}
            rows[f"{size}/{replicas}"] = {"config": config, "replicas": replicas, "medians_s": medians,
                                          "ratios": ratios, "ratio": ratios["autosyncbn"]}
            print(f"  {size:<6} {replicas} replicas: unsynchronized {medians['unsynchronized'] * 1e3:7.2f} ms"
                  f"   autosyncbn {ratios['autosyncbn']:.3f}x   floor {ratios['floor']:.3f}x"
                  f"   classic {ratios['classic']:.3f}x"
                  + (f"   (target <= floor + 0.05 = {ratios['floor'] + 0.05:.3f}x, "
                     f"{1 - medians['autosyncbn'] / medians['classic']:.0%} faster than classic; target >= 15%)"
                     if replicas == 4 else ""))
    result = {"rows": rows, "target": "autosyncbn <= floor + 0.05x and >= 15% faster than classic at 4 replicas"}
    write_json("sync_cost", result)
    return result


if __name__ == "__main__":
    main()
