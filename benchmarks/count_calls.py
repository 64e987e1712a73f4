"""Python function calls per synchronized replica-call, forward and backward apart: counts, not times.

One training step of a small ResNet-style CNN (7 BatchNorm layers, 16
channels, 16x16 px, 2 samples per replica) on 4 emulated replicas, with every
thread profiled (``threading.setprofile`` for the replica threads, which are
started anew at each forward, and ``sys.setprofile`` for the calling thread,
where autograd runs backward on the CPU). Only ``'call'`` events count: Python
function calls, generator resumptions included; calls into C (``'c_call'``)
do not. Per variant, the step's calls minus those of the same step
unsynchronized (plain BatchNorm, nothing installed), divided by
layers x replicas. Forward is ``out = dp(x)``, backward ``loss.backward()``.
The variants are bench_sync_cost.py's: ``floor`` (BatchNorm that only waits
at a barrier), ``split floor``, ``classic`` (sums gathered by replica 0
through queues) and ``autosyncbn`` (plain BatchNorm under
``autosyncbn.patched()``).

Each variant is warmed up, then counted over several steps; the median is
reported (waiting on a condition adds calls, so counts can wobble by a few).
Target: autosyncbn forward <= 35, backward <= 8. Writes results/calls.json.

``--profile N`` also prints, per variant, the N (file:function) entries that
the synchronized step calls most often beyond the unsynchronized one.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import threading
from typing import Callable, ContextManager, Iterator

import torch

import autosyncbn
from bench_sync_cost import variants
from common import report, resnet_like

TARGET = {"forward": 35, "backward": 8}
PHASES = ("forward", "backward")


@contextlib.contextmanager
def counting_calls() -> Iterator[collections.Counter]:
    """Counts the Python calls (``'call'`` events) in this thread and in threads started meanwhile."""
    counters: list[collections.Counter] = []
    local = threading.local()

    def hook(frame, event, arg) -> None:
        if event != "call":
            return
        counter = getattr(local, "counter", None)
        if counter is None:  # one counter a thread: no lost updates between threads
            counter = local.counter = collections.Counter()
            counters.append(counter)
        code = frame.f_code
        counter[(code.co_filename, code.co_qualname if hasattr(code, "co_qualname") else code.co_name)] += 1

    total: collections.Counter = collections.Counter()
    threading.setprofile(hook)
    sys.setprofile(hook)
    try:
        yield total
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        for counter in counters:
            total.update(counter)


def counted_step(model: torch.nn.Module, x: torch.Tensor) -> dict[str, collections.Counter]:
    """The calls of one training step, forward and backward apart."""
    model.zero_grad(set_to_none=True)
    with counting_calls() as forward:
        out = model(x)
    loss = out.square().mean()
    with counting_calls() as backward:
        loss.backward()
    return {"forward": forward, "backward": backward}


def median_step(steps: list[dict[str, collections.Counter]], phase: str) -> collections.Counter:
    """The counted step whose total calls in ``phase`` is the median."""
    ordered = sorted((sum(step[phase].values()), index) for index, step in enumerate(steps))
    return steps[ordered[len(ordered) // 2][1]][phase]


def main(replicas: int = 4, layers: int = 7, warmup: int = 2, steps: int = 5, profile: int = 0) -> dict:
    if layers < 1 or layers % 2 == 0:
        raise SystemExit("--layers must be odd: the model has 2 * blocks + 1 BatchNorm layers")
    torch.manual_seed(0)
    x = torch.randn(2 * replicas, 3, 16, 16)
    models = variants(resnet_like(width=16, blocks=(layers - 1) // 2), replicas)
    scopes: dict[str, Callable[[], ContextManager]] = {"autosyncbn": autosyncbn.patched}
    counted: dict[str, list] = {}
    for name, model in models.items():
        with scopes.get(name, contextlib.nullcontext)():
            for _ in range(warmup):
                counted_step(model, x)
            counted[name] = [counted_step(model, x) for _ in range(steps)]
    totals = {name: {phase: [sum(step[phase].values()) for step in runs] for phase in PHASES}
              for name, runs in counted.items()}
    calls = replicas * layers
    base = {phase: statistics.median(totals["unsynchronized"][phase]) for phase in PHASES}
    per_call = {name: {phase: (statistics.median(totals[name][phase]) - base[phase]) / calls for phase in PHASES}
                for name in counted if name != "unsynchronized"}
    print(f"Python calls per synchronized replica-call ({layers} BatchNorm x {replicas} emulated replicas, "
          f"16ch, 16px, 2/replica; median of {steps} steps minus the unsynchronized step: "
          f"forward {base['forward']:.0f}, backward {base['backward']:.0f} calls)")
    print(f"  {'variant':<12} {'forward':>8} {'backward':>9}   per-step spread (forward / backward calls)")
    for name, row in per_call.items():
        spread = " / ".join(f"{min(totals[name][p]) - base[p]:.0f}..{max(totals[name][p]) - base[p]:.0f}"
                            for p in PHASES)
        print(f"  {name:<12} {row['forward']:8.1f} {row['backward']:9.1f}   {spread}")
    print(f"autosyncbn target: forward <= {TARGET['forward']}, backward <= {TARGET['backward']}")
    if profile:
        show_profile(counted, calls, profile)
    return report("calls", {"replicas": replicas, "layers": layers, "per_replica_call": per_call,
                            "step_calls": totals, "target": TARGET})


def show_profile(counted: dict[str, list], calls: int, most: int) -> None:
    """The entries each synchronized step calls most beyond the unsynchronized one, per replica-call."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, runs in counted.items():
        if name == "unsynchronized":
            continue
        for phase in PHASES:
            ours, base = median_step(runs, phase), median_step(counted["unsynchronized"], phase)
            extra = {key: ours[key] - base[key] for key in ours.keys() | base.keys() if ours[key] != base[key]}
            print(f"\n{name}, {phase}: the {most} entries called most beyond the unsynchronized step "
                  f"(calls per replica-call)")
            for (filename, function), count in sorted(extra.items(), key=lambda kv: -abs(kv[1]))[:most]:
                print(f"  {count / calls:+7.2f}  {short(filename, root)}:{function}")


def short(filename: str, root: str) -> str:
    """A file's path after site-packages, in the project, or its name (the standard library)."""
    marker = "site-packages" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1]
    if filename.startswith(root + os.sep):
        return os.path.relpath(filename, root)
    return os.path.basename(filename)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4, help="emulated replicas (default 4)")
    parser.add_argument("--layers", type=int, default=7, help="BatchNorm layers, odd (default 7)")
    parser.add_argument("--steps", type=int, default=5, help="counted steps per variant (default 5)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N entries called most beyond the unsynchronized step")
    args = parser.parse_args()
    main(args.replicas, args.layers, steps=args.steps, profile=args.profile)
