"""PyTorch Lightning on 2 CPU processes (gloo) with synchronized BatchNorm: one plugin.

    pip install autosyncbn[lightning]
    python examples/lightning_cpu.py

Lightning's own ``Trainer(sync_batchnorm=True)`` uses ``nn.SyncBatchNorm``, which
refuses CPU tensors. Lightning's "ddp" strategy starts rank 1 by running this
script again. Each rank holds 2 samples of every batch; BatchNorm sees all 4.
"""
import copy
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

try:
    from autosyncbn.lightning import AutoSyncBatchNorm
except ImportError as error:  # Lightning is an optional dependency
    print(f"skipped: {error}")
    sys.exit(0)
try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

STEPS, PER_RANK, WORLD = 3, 2, 2


def global_batches() -> list:
    """The same batches in every process: (images, labels) of WORLD * PER_RANK samples."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * PER_RANK, 3, 8, 8, generator=generator),
             torch.randint(0, 4, (WORLD * PER_RANK,), generator=generator)) for _ in range(STEPS)]


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights in every process
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self.net(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        mine = slice(PER_RANK * self.global_rank, PER_RANK * (self.global_rank + 1))
        return DataLoader([(x[mine], y[mine]) for x, y in global_batches()], batch_size=None)


def main() -> None:
    model = Classifier()
    reference = copy.deepcopy(model.net)  # one process, the whole global batch, plain BatchNorm
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy="ddp", plugins=[AutoSyncBatchNorm()],
        max_steps=STEPS, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)  # after fit, the plugin has put plain BatchNorm layers back
    if trainer.global_rank != 0:
        return
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for images, labels in global_batches():
        # Lightning's DDP averages gradients over ranks: the mean loss of the global batch.
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(images), labels).backward()
        optimizer.step()
    gap = (model.net[1].running_mean - reference[1].running_mean).abs().max().item()
    print(f"layers after fit: {type(model.net[1]).__name__}")
    print(f"{WORLD} ranks x {PER_RANK} samples: |running_mean - one process with the global batch| = {gap:.2e}")


if __name__ == "__main__":
    main()
