"""Synchronization cost: a training step under emulated DataParallel, beside its floor and a peer.

A ResNet-style CNN (13 BatchNorm layers) with 2, 4 and 8 CPU replicas in
threads, at two sizes: "small" (16 channels, 32x32, 4 samples per replica),
where per-call costs dominate, and "medium" (32 channels, 64x64, 2 samples per
replica). Five variants run interleaved in one process, each relative to the
unsynchronized step:

- ``autosyncbn``: the plain model under ``autosyncbn.patched()``;
- ``floor``: BatchNorm that only waits at a barrier of all replicas;
- ``split floor``: the same, split as a synchronized BatchNorm must be
  (statistics kernel, barrier, normalization kernel), with no Python around;
- ``classic``: the classic sync_batchnorm algorithm (sums through queues).

Targets at 4 replicas (issue 18): small, autosyncbn <= floor + 0.12x and <=
0.85x the classic step; medium, <= floor + 0.06x. Writes results/sync_cost.json.

``--split`` times instead the forward alone and the whole step of each
variant at 4 replicas, "small" size, and prints backward as their
difference: where a variant's cost lies (writes nothing).
"""
from __future__ import annotations

import argparse
import copy
import functools

import torch

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel
from common import interleaved_medians, resnet_like, training_step, write_json
from peers import BarrierBatchNorm2d, ClassicSyncBatchNorm2d, SplitBarrierBatchNorm2d, with_batchnorm

SIZES = {"small": dict(width=16, image=32, per_replica=4), "medium": dict(width=32, image=64, per_replica=2)}


def _target(size: str, replicas: int, ratios: dict) -> str:
    """Issue 18's targets at 4 replicas, with autosyncbn step / classic step."""
    if replicas != 4:
        return ""
    slack = 0.12 if size == "small" else 0.06
    versus = f", autosyncbn / classic {ratios['autosyncbn'] / ratios['classic']:.2f}x (target <= 0.85x)"
    return f"   (target <= floor + {slack} = {ratios['floor'] + slack:.3f}x{versus if size == 'small' else ''})"


def variants(model: torch.nn.Module, replicas: int) -> dict:
    """The steps to time, each on its own copy of the same model."""
    def parallel(make=None):
        copy_ = copy.deepcopy(model)
        return EmulatedDataParallel(with_batchnorm(copy_, make) if make else copy_, replicas)

    return {
        "unsynchronized": parallel(),
        "autosyncbn": parallel(),
        "floor": parallel(functools.partial(BarrierBatchNorm2d, replicas=replicas)),
        "split floor": parallel(functools.partial(SplitBarrierBatchNorm2d, replicas=replicas)),
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
                  f"   split floor {ratios['split floor']:.3f}x   classic {ratios['classic']:.3f}x"
                  + _target(size, replicas, ratios))
    result = {"rows": rows, "target": "4 replicas: small <= floor + 0.12x and <= 0.85x classic; medium <= floor + 0.06x"}
    write_json("sync_cost", result)
    return result


def split(repeats: int = 20, replicas: int = 4, size: str = "small") -> dict:
    """Forward and backward of each variant, in ms over the unsynchronized step's."""
    torch.manual_seed(0)
    config = SIZES[size]
    x = torch.randn(config["per_replica"] * replicas, 3, config["image"], config["image"])
    models = variants(resnet_like(width=config["width"], blocks=6), replicas)

    def forward(model):
        return lambda: model(x)

    candidates = {}
    for name, model in models.items():
        candidates[f"{name}/step"] = training_step(model, x)
        candidates[f"{name}/forward"] = forward(model)
    scopes = {"autosyncbn/step": autosyncbn.patched, "autosyncbn/forward": autosyncbn.patched}
    medians = interleaved_medians(candidates, repeats, scopes=scopes)
    base_forward = medians["unsynchronized/forward"]
    base_backward = medians["unsynchronized/step"] - base_forward
    print(f"forward and backward (step - forward), {size}, {replicas} replicas: ms over the unsynchronized "
          f"step's ({base_forward * 1e3:.1f} ms forward, {base_backward * 1e3:.1f} ms backward)")
    extra = {}
    for name in models:
        if name == "unsynchronized":
            continue
        forward_s = medians[f"{name}/forward"]
        backward_s = medians[f"{name}/step"] - forward_s
        extra[name] = {"forward_ms": (forward_s - base_forward) * 1e3,
                       "backward_ms": (backward_s - base_backward) * 1e3}
        print(f"  {name:<12} forward {extra[name]['forward_ms']:+7.2f} ms"
              f"   backward {extra[name]['backward_ms']:+7.2f} ms")
    return extra


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", action="store_true", help="forward and backward apart, 4 replicas, small")
    if parser.parse_args().split:
        split()
    else:
        main()
