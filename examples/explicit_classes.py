"""Say it in code: convert_model() and DataParallelWithCallback, no global patch.

This is the classic sync_batchnorm API; a project that used that package can
switch by changing its import.
"""
import torch
from torch import nn

from autosyncbn import DataParallelWithCallback, convert_model, patch_replication_callback, revert_model
from autosyncbn.testing import EmulatedDataParallel

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
model = convert_model(model)  # BatchNorm2d -> SynchronizedBatchNorm2d, same parameters
print(model)

if torch.cuda.device_count() > 1:
    parallel = DataParallelWithCallback(model.cuda(), device_ids=list(range(torch.cuda.device_count())))
    device = "cuda"
else:
    # On CPU: emulated replicas, patched like an existing nn.DataParallel instance.
    parallel = EmulatedDataParallel(model, num_replicas=4)
    patch_replication_callback(parallel)
    device = "cpu"

x = torch.randn(8, 3, 12, 12, device=device)
out = parallel(x)
out.square().mean().backward()
reference = revert_model(model)(x)  # the way back, for export: plain BatchNorm2d
print(f"max |synchronized - one device| = {(out - reference).abs().max().item():.2e}")
