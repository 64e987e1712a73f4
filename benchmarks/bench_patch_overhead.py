"""Patch overhead: a BatchNorm-heavy CNN outside DataParallel, installed vs not installed.

Target: <= 1.02x. Prints medians and the ratio; writes results/patch_overhead.json.
"""
from __future__ import annotations

import torch

import autosyncbn
from common import interleaved_medians, resnet_like, training_step, write_json


def main(repeats: int = 40) -> dict:
    torch.manual_seed(0)
    model = resnet_like(width=16, blocks=6)
    step = training_step(model, torch.randn(8, 3, 32, 32))
    medians = interleaved_medians({"plain": step, "installed": step}, repeats,
                                  scopes={"installed": autosyncbn.patched})
    ratio = medians["installed"] / medians["plain"]
    print("patch overhead: training step of a CNN with 13 BatchNorm layers, outside DataParallel")
    print(f"  not installed {medians['plain'] * 1e3:7.2f} ms   installed {medians['installed'] * 1e3:7.2f} ms"
          f"   ratio {ratio:.3f}x   (target <= 1.02x)")
    result = {"medians_s": medians, "ratio": ratio, "target": 1.02}
    write_json("patch_overhead", result)
    return result


if __name__ == "__main__":
    main()
