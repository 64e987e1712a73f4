"""DistributedDataParallel with synchronized BatchNorm on CPU (gloo).

    torchrun --nproc_per_node 2 examples/ddp_cpu.py

torch.nn.SyncBatchNorm refuses CPU tensors; autosyncbn's layers synchronize
over any process group. Each rank holds 2 samples; BatchNorm sees all 4.
"""
import copy
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import autosyncbn


def train(rank: int, world: int) -> float:
    """Three DDP steps; returns |running_mean - one process with the global batch|."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    reference = copy.deepcopy(model)  # one process, the whole global batch, plain BatchNorm
    ddp = nn.parallel.DistributedDataParallel(autosyncbn.convert_model(model))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)

    generator = torch.Generator().manual_seed(1)  # the same global batches on every rank
    for step in range(3):
        images = torch.randn(2 * world, 3, 8, 8, generator=generator)
        labels = torch.randint(0, 4, (2 * world,), generator=generator)
        local = slice(2 * rank, 2 * rank + 2)
        loss = nn.functional.cross_entropy(ddp(images[local]), labels[local])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # DDP averages gradients over ranks: the reference takes the mean loss of the global batch.
        ref_loss = nn.functional.cross_entropy(reference(images), labels)
        ref_optimizer.zero_grad()
        ref_loss.backward()
        ref_optimizer.step()
        if rank == 0:
            print(f"step {step}: loss on rank 0 {loss.item():.4f}")
    return (ddp.module[1].running_mean - reference[1].running_mean).abs().max().item()


def main() -> None:
    dist.init_process_group("gloo")  # torchrun provides rank, world size and address
    rank, world = dist.get_rank(), dist.get_world_size()
    gap = train(rank, world)  # DDP is gone once this returns: nothing holds the group any more
    if rank == 0:
        print(f"{world} ranks x 2 samples: |running_mean - one process with the global batch| = {gap:.2e}")
    # Free what still refers to the group (autograd graphs, DDP's reducer) before tearing
    # it down; gloo can abort a process whose work objects outlive destroy_process_group.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
