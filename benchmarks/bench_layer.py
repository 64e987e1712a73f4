"""One layer: forward+backward of a synchronized BatchNorm vs nn.BatchNorm on the same slices.

Both run as 2 emulated replicas (threads), so only the layer differs.
Target: <= 1.5x. Writes results/layer.json.
"""
from __future__ import annotations

import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel
from common import interleaved_medians, report

SHAPES = {
    "small C, large HxW (16, 8, 64, 64)": (16, 8, 64, 64),
    "large C, small HxW (16, 256, 8, 8)": (16, 256, 8, 8),
    "(N, C) (256, 512)": (256, 512),
}


def main(repeats: int = 30, replicas: int = 2) -> dict:
    torch.manual_seed(0)
    rows = {}
    print(f"one layer, forward+backward, {replicas} emulated replicas: synchronized vs nn.BatchNorm")
    for label, shape in SHAPES.items():
        layer = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1])
        parallel = EmulatedDataParallel(layer, replicas)
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn(*shape)

        def step(parallel=parallel, x=x, grad=grad) -> None:
            x.grad = None
            parallel(x).backward(grad)

        medians = interleaved_medians({"nn.BatchNorm": step, "synchronized": step}, repeats,
                                      scopes={"synchronized": autosyncbn.patched})
        ratio = medians["synchronized"] / medians["nn.BatchNorm"]
        rows[label] = {"medians_s": medians, "ratio": ratio}
        print(f"  {label:<36} nn.BatchNorm {medians['nn.BatchNorm'] * 1e3:7.3f} ms"
              f"   synchronized {medians['synchronized'] * 1e3:7.3f} ms   ratio {ratio:.2f}x   (target <= 1.5x)")
    return report("layer", {"by_shape": rows, "target": 1.5})


if __name__ == "__main__":
    main()
