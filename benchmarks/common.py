"""Shared by the benchmark scripts: interleaved timing, models, JSON output."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.distributed
from torch import nn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def interleaved_medians(candidates: dict[str, Callable[[], None]], repeats: int = 20, warmup: int = 3,
                        scopes: Optional[dict[str, Callable[[], ContextManager]]] = None) -> dict[str, float]:
    """Median seconds per call of each candidate, run in turn so drift hits all alike.

    ``scopes[name]()`` is entered around that candidate's call, outside the timed region
    (e.g. ``autosyncbn.patched``), so switching between candidates is not measured.
    """
    scopes = scopes or {}
    samples: dict[str, list] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, run in candidates.items():
            with scopes.get(name, contextlib.nullcontext)():
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
            if round_ >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def ranks_in_step() -> Iterator[None]:
    """Every rank starts the step together (a barrier, outside the timed region): a scope for
    :func:`interleaved_medians` in process benchmarks."""
    torch.distributed.barrier()
    yield


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict, folder: Optional[str] = None) -> str:
    folder = folder or RESULTS
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as handle:
        json.dump({"machine": machine(), **payload}, handle, indent=2)
    return path


def report(name: str, payload: dict) -> dict:
    """``payload`` written to results/<name>.json, and returned: the end of each script's ``main``."""
    write_json(name, payload)
    return payload


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet_like(width: int = 16, blocks: int = 6, classes: int = 10) -> nn.Module:
    """A small ResNet-style CNN with 2 * blocks + 1 BatchNorm layers."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        *[BasicBlock(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes),
    )


def training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    return step
