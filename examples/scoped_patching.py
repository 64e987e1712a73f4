"""Synchronize BatchNorm for one block of code only, with autosyncbn.patched().

The same 4-replica forward is run with and without the scope: inside it the
output equals one device running the whole batch; outside it each replica
normalizes its own slice, as plain DataParallel does.
"""
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel

torch.manual_seed(0)
layer = nn.BatchNorm1d(3)
parallel = EmulatedDataParallel(layer, num_replicas=4)
x = torch.randn(8, 3) + torch.arange(8.0).unsqueeze(1)  # slices with different means
whole_batch = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True)

with autosyncbn.patched():
    inside = parallel(x)
outside = parallel(x)

print(f"inside  patched(): max |out - whole batch| = {(inside - whole_batch).abs().max().item():.2e}")
print(f"outside patched(): max |out - whole batch| = {(outside - whole_batch).abs().max().item():.2e}")
print(f"installed after the block: {autosyncbn.is_installed()}")
