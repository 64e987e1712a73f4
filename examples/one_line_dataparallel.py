"""An existing nn.DataParallel training script, plus one line: autosyncbn.install().

Runs anywhere: on a machine with several GPUs it uses nn.DataParallel itself;
on a CPU-only machine it uses autosyncbn.testing.EmulatedDataParallel (four
CPU replicas, each in its own thread), which DataParallel code cannot tell apart.
"""
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel

autosyncbn.install()  # <- the one line: every DataParallel now synchronizes BatchNorm

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
)
if torch.cuda.device_count() > 1:
    model = nn.DataParallel(model.cuda())
    device = "cuda"
else:
    model = EmulatedDataParallel(model, num_replicas=4)
    device = "cpu"

optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    images = torch.randn(8, 3, 16, 16, device=device)  # 2 samples per replica
    labels = torch.randint(0, 10, (8,), device=device)
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")

bn = model.module[1]
print(f"running statistics come from whole batches: {bn.num_batches_tracked.item()} updates, "
      f"running_var mean {bn.running_var.mean().item():.4f}")
autosyncbn.uninstall()
