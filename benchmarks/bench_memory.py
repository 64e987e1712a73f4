"""Memory: bytes saved for backward by one synchronized layer vs nn.BatchNorm, same slices.

Counted with torch.autograd.graph.saved_tensors_hooks inside each replica's
thread (the hooks are thread-local). "packed" counts every pack; "unique"
counts each tensor's memory once. Target: <= 1.0x plus per-channel vectors.
Writes results/memory.json.
"""
from __future__ import annotations

import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel, SavedTensorsLedger
from common import write_json

SHAPES = {"(16, 64, 32, 32)": (16, 64, 32, 32), "(32, 256)": (32, 256), "(4, 16, 8, 16, 16)": (4, 16, 8, 16, 16)}


def measure(layer: nn.Module, x: torch.Tensor, replicas: int) -> dict:
    ledger = SavedTensorsLedger(layer)
    EmulatedDataParallel(ledger, replicas)(x.clone().requires_grad_()).sum().backward()
    records = ledger.records
    vector_bytes = x.shape[1] * 8  # a per-channel vector, float64 at most
    unique = {}
    for pointer, size in records:
        unique[pointer] = max(unique.get(pointer, 0), size)
    return {
        "packed": ledger.saved_bytes(),
        "unique": sum(unique.values()),
        "activation_sized": ledger.saved_bytes(larger_than=vector_bytes),
        "per_channel_vectors": sum(1 for _, size in records if size <= vector_bytes),
    }


def main(replicas: int = 4) -> dict:
    torch.manual_seed(0)
    rows = {}
    print(f"memory saved for backward, one layer, {replicas} emulated replicas")
    for label, shape in SHAPES.items():
        cls = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
        x = torch.randn(*shape)
        plain = measure(cls(shape[1]), x, replicas)
        with autosyncbn.patched():
            synchronized = measure(cls(shape[1]), x, replicas)
        activation = x.numel() * x.element_size()
        ratio = synchronized["activation_sized"] / plain["activation_sized"]
        rows[label] = {"plain": plain, "synchronized": synchronized, "activation_bytes": activation,
                       "ratio": ratio, "ratio_all_bytes": synchronized["packed"] / plain["packed"]}
        print(f"  {label:<20} input {activation:>9} B | activation-sized saved: nn.BatchNorm"
              f" {plain['activation_sized']:>9} B, synchronized {synchronized['activation_sized']:>9} B"
              f" -> {ratio:.3f}x | per-channel vectors {plain['per_channel_vectors']} vs"
              f" {synchronized['per_channel_vectors']} | all bytes {rows[label]['ratio_all_bytes']:.4f}x"
              f"   (target <= 1.0x + per-channel vectors)")
    result = {"by_shape": rows}
    write_json("memory", result)
    return result


if __name__ == "__main__":
    main()
