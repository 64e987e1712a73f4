"""Numerics: max error against a float64 reference, well- and ill-conditioned inputs.

Input: 32 x 8 x 16 x 16, float32, unit spread around a mean of 0 ... 3e4.
Compared with BatchNorm computed in float64 on the whole batch:
- PyTorch: nn.BatchNorm2d on the whole batch in float32;
- autosyncbn: 4 emulated replicas, synchronized, float32;
- naive: per-replica sum and sum of squares, var = E[x^2] - E[x]^2, float32.
Target: autosyncbn <= 2x PyTorch's own error. Writes results/numerics.json.
"""
from __future__ import annotations

import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel
from common import report

MEANS = [0.0, 1e2, 1e3, 1e4, 3e4]


def naive_sum_of_squares(x: torch.Tensor, replicas: int, eps: float = 1e-5) -> torch.Tensor:
    parts = x.chunk(replicas)
    dims = (0, 2, 3)
    total = sum(p.sum(dims) for p in parts)
    total_sq = sum(p.square().sum(dims) for p in parts)
    count = x.numel() // x.shape[1]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0)
    return (x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + eps).sqrt()


def main(replicas: int = 4) -> dict:
    rows = {}
    print("numerics: max |error| of the normalized output against float64, per input mean")
    print(f"  {'mean':>8} {'PyTorch':>10} {'autosyncbn':>11} {'naive':>10}   autosyncbn/PyTorch")
    for offset in MEANS:
        generator = torch.Generator().manual_seed(0)
        x64 = torch.randn(32, 8, 16, 16, dtype=torch.float64, generator=generator) + offset
        x = x64.float()
        exact = nn.functional.batch_norm(x.double(), None, None, training=True)
        pytorch = nn.BatchNorm2d(8, affine=False)(x)
        with autosyncbn.patched():
            ours = EmulatedDataParallel(nn.BatchNorm2d(8, affine=False), replicas)(x)
        naive = naive_sum_of_squares(x, replicas)
        errors = {name: (value.double() - exact).abs().max().item()
                  for name, value in (("pytorch", pytorch), ("autosyncbn", ours), ("naive", naive))}
        ratio = errors["autosyncbn"] / max(errors["pytorch"], 1e-12)
        rows[str(offset)] = {**errors, "ratio": ratio}
        print(f"  {offset:>8.0e} {errors['pytorch']:>10.2e} {errors['autosyncbn']:>11.2e} {errors['naive']:>10.2e}"
              f"   {ratio:.2f}x   (target <= 2x)")
    return report("numerics", {"by_mean": rows, "target": 2.0})


if __name__ == "__main__":
    main()
