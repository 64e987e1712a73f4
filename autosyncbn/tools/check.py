"""``python -m autosyncbn check``: does synchronized BatchNorm match one device here?

Runs a BatchNorm model under DataParallel on every visible GPU (or on
emulated CPU replicas when there is none) with ``autosyncbn`` installed, and
compares output, gradients and running statistics with one device running the
whole batch. Prints which layers synchronized (``sync_report``), a table of errors and the
time overhead against unsynchronized BatchNorm; exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from .. import patching
from ..report import SyncReport, sync_report
from .testing import EmulatedDataParallel


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8, momentum=None),
    )


def _parallel(model: nn.Module, replicas: int) -> nn.Module:
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return nn.DataParallel(model, device_ids=[i % count for i in range(replicas)])
    return EmulatedDataParallel(model, replicas)


def _relative_error(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], scale: float = 0.0) -> float:
    """Largest difference relative to the scale of the values (at least 1)."""
    if actual is None or expected is None:
        raise RuntimeError("a gradient to compare is missing (None): its tensor took no part in backward")
    scale = max(scale, expected.abs().max().item(), 1.0)
    return (actual.double() - expected.double()).abs().max().item() / scale


def compare(replicas: int, batch: int, steps: int = 3, seed: int = 0) -> dict:
    """Largest relative error of each quantity over ``steps`` training steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = _model().to(device)
    reference = copy.deepcopy(model)
    parallel = _parallel(model, replicas)
    errors: dict = {}

    def record(name: str, value: float) -> None:
        errors[name] = max(errors.get(name, 0.0), value)

    with patching.patched():
        for _ in range(steps):
            x = (torch.randn(batch, 3, 12, 12, device=device) * 2 + 1).requires_grad_()
            x_ref = x.detach().clone().requires_grad_()
            target = torch.randn(batch, 8, 12, 12, device=device)
            out, ref_out = parallel(x), reference(x_ref)
            (out * target).sum().backward()
            (ref_out * target).sum().backward()
            record("output", _relative_error(out, ref_out))
            record("input grad", _relative_error(x.grad, x_ref.grad))
            # A bias right before BatchNorm has zero gradient in exact arithmetic:
            # judge every gradient against the largest gradient of the model.
            grad_scale = max(q.grad.abs().max().item() for q in reference.parameters())  # type: ignore[union-attr]
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                kind = "weight grad" if name.endswith("weight") else "bias grad"
                record(kind, _relative_error(p.grad, q.grad, grad_scale))
            for (name, b), c in zip(model.named_buffers(), reference.buffers()):
                if name.endswith("running_mean"):
                    record("running_mean", _relative_error(b, c))
                elif name.endswith("running_var"):
                    record("running_var", _relative_error(b, c))
            for m in (model, reference):
                m.zero_grad()
    return errors


def overhead(replicas: int, batch: int, repeats: int = 15) -> float:
    """Median step time synchronized / unsynchronized, interleaved in one run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _model().to(device)
    parallel = _parallel(model, replicas)
    x = torch.randn(batch, 3, 12, 12, device=device)
    times: dict = {True: [], False: []}

    def step() -> None:
        parallel(x).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    for _ in range(repeats):
        for synchronized in (False, True):
            start = time.perf_counter()
            if synchronized:
                with patching.patched():
                    step()
            else:
                step()
            times[synchronized].append(time.perf_counter() - start)
    return statistics.median(times[True]) / statistics.median(times[False])


def count_argument(noun: str, minimum: int = 1, why: str = "") -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum``, so a bad value is a usage error, not a traceback."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of {noun}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}{why}")
        return value

    return parse


def _tolerance(text: str) -> float:
    """An argparse ``type``: a finite number >= 0 (a negative one would fail every layer)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``check``; values that cannot run end in a usage error (exit code 2).

    ``--batch 1`` and ``--replicas 1`` are accepted: DataParallel gives every
    replica at least one sample, so either runs one replica, which takes
    PyTorch's own path (the report says so) and must match one device exactly.
    An empty batch has nothing to compare and is refused.
    """
    default = torch.cuda.device_count() if torch.cuda.device_count() > 1 else 4
    parser.add_argument("--replicas", type=count_argument("replicas"), default=default,
                        help=f"replicas (default {default})")
    parser.add_argument("--batch", type=count_argument("samples", why=": with no sample there is nothing to compare"),
                        default=10, help="whole batch of 12x12 images (default 10: uneven slices); "
                                         "DataParallel runs min(batch, replicas) replicas")
    parser.add_argument("--tolerance", type=_tolerance, default=1e-4,
                        help="largest relative error allowed (default 1e-4)")


def what_synchronized(replicas: int, batch: int) -> SyncReport:
    """One training forward under ``sync_report``: which layers synchronized, and why not."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _model().to(device)
    model[7].eval()  # one layer in eval mode, to show a layer that is not synchronized
    with patching.patched(), sync_report() as report:
        _parallel(model, replicas)(torch.randn(batch, 3, 12, 12, device=device))
    return report


def main(args: argparse.Namespace) -> int:
    where = (f"{torch.cuda.device_count()} CUDA device(s): {torch.cuda.get_device_name(0)}"
             if torch.cuda.is_available() else "no GPU: emulated CPU replicas")
    print(f"autosyncbn check: {args.replicas} replicas, batch {args.batch}, on {where}")
    if args.batch < args.replicas:
        print(f"(a batch of {args.batch} runs only {args.batch} replica(s): DataParallel gives each "
              f"at least one sample)")
    print("what synchronized in one forward (the last layer set to eval mode):")
    print(what_synchronized(args.replicas, args.batch))
    print()
    errors = compare(args.replicas, args.batch)
    print(f"{'quantity':<14} {'max rel. error':>15}  status")
    failed = False
    for name, value in errors.items():
        ok = value <= args.tolerance
        failed |= not ok
        print(f"{name:<14} {value:>15.2e}  {'ok' if ok else 'MISMATCH'}")
    ratio = overhead(args.replicas, args.batch)
    print(f"time per training step, synchronized / unsynchronized: {ratio:.2f}x")
    print("MISMATCH: synchronized BatchNorm does not match one device" if failed else "all match")
    return 1 if failed else 0
