"""Where the time of a synchronized step goes: the profile behind the README's explanation.

    python benchmarks/profile_sync.py

1. Kernels on one 4x16x32x32 slice: PyTorch's statistics kernel and eval-mode
   normalization (what a synchronized call runs) vs the fused training kernel.
2. Emulated DataParallel, 4 replicas, the "small" CNN: forward and backward
   times, synchronized vs not, and per synchronized call the arrival skew
   between first and last replica, the merge, and the wake-up of the last waiter.
3. gloo, 2 processes: latency of the all-gather when idle, all-gather + sum
   vs all-reduce for backward's reduction, and the share of a synchronized
   step spent inside the collectives.
Writes results/profile.json.
"""
from __future__ import annotations

import collections
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autosyncbn  # noqa: E402
from autosyncbn import distributed as process_groups  # noqa: E402
from autosyncbn import group as replica_groups  # noqa: E402
from autosyncbn.testing import EmulatedDataParallel  # noqa: E402
from common import resnet_like, write_json  # noqa: E402


def _per_call_us(fn, repeats: int = 300) -> float:
    for _ in range(30):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def kernels() -> dict:
    x = torch.randn(4, 16, 32, 32)
    weight, bias = torch.ones(16), torch.zeros(16)
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    figures = {
        "statistics kernel": _per_call_us(lambda: torch.batch_norm_update_stats(x, None, None, 0.0)),
        "eval-mode normalize": _per_call_us(
            lambda: torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, 1e-5)),
        "fused training kernel": _per_call_us(
            lambda: torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5)),
    }
    print("1. kernels on a 4x16x32x32 slice (microseconds per call):")
    for name, value in figures.items():
        print(f"   {name:<24} {value:7.1f}")
    return figures


@contextlib.contextmanager
def _timing_replica_groups(log: list):
    exchange, complete = replica_groups.ReplicaGroup.exchange, replica_groups.ReplicaGroup._complete

    def timed_exchange(self, replica, call, contribution):
        start = time.perf_counter()
        result = exchange(self, replica, call, contribution)
        log.append(("exchange", id(self), call, start, time.perf_counter()))
        return result

    def timed_complete(self, call, slot):
        start = time.perf_counter()
        complete(self, call, slot)
        log.append(("merge", id(self), call, start, time.perf_counter()))

    replica_groups.ReplicaGroup.exchange, replica_groups.ReplicaGroup._complete = timed_exchange, timed_complete
    try:
        yield
    finally:
        replica_groups.ReplicaGroup.exchange, replica_groups.ReplicaGroup._complete = exchange, complete


def replica_threads(repeats: int = 15) -> dict:
    torch.manual_seed(0)
    parallel = EmulatedDataParallel(resnet_like(width=16, blocks=6), 4)
    x = torch.randn(16, 3, 32, 32)
    split: dict = {}
    for synchronized in (False, True):
        forward, backward = [], []
        for round_ in range(repeats + 3):
            with autosyncbn.patched() if synchronized else contextlib.nullcontext():
                start = time.perf_counter()
                loss = parallel(x).square().mean()
                middle = time.perf_counter()
                loss.backward()
                end = time.perf_counter()
            if round_ >= 3:
                forward.append(middle - start)
                backward.append(end - middle)
        split["synchronized" if synchronized else "unsynchronized"] = {
            "forward_ms": statistics.median(forward) * 1e3, "backward_ms": statistics.median(backward) * 1e3}
    log: list = []
    with autosyncbn.patched(), _timing_replica_groups(log), torch.no_grad():
        for _ in range(10):
            parallel(x)
    calls = collections.defaultdict(list)
    for kind, group, call, start, end in log:
        calls[(group, call)].append((kind, start, end))
    skew, merge, wake = [], [], []
    for events in calls.values():
        arrivals = [start for kind, start, _ in events if kind == "exchange"]
        leaves = [end for kind, _, end in events if kind == "exchange"]
        merge_start, merge_end = next((start, end) for kind, start, end in events if kind == "merge")
        skew.append(max(arrivals) - min(arrivals))
        merge.append(merge_end - merge_start)
        wake.append(max(leaves) - merge_end)
    per_call = {"arrival_skew_us": statistics.median(skew) * 1e6, "merge_us": statistics.median(merge) * 1e6,
                "last_wake_us": statistics.median(wake) * 1e6}
    print("2. emulated DataParallel, 4 replicas, small CNN (13 BatchNorm calls per forward):")
    for name, row in split.items():
        print(f"   {name:<15} forward {row['forward_ms']:6.1f} ms   backward {row['backward_ms']:6.1f} ms")
    print(f"   per synchronized call (median): arrival skew {per_call['arrival_skew_us']:.0f} us,"
          f" merge {per_call['merge_us']:.0f} us, last waiter running again {per_call['last_wake_us']:.0f} us"
          f" after the merge")
    return {"split": split, "per_call": per_call}


def _gloo_rank(rank: int, world: int, init_file: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    record = torch.ones(4 + 2 * process_groups.FIRST_CHANNELS, dtype=torch.float64)
    idle = _per_call_us(lambda: process_groups._gather(record, None), repeats=200)
    # Backward reduces 2C values: all-gather + local sum vs all-reduce (C = 32).
    sums = torch.ones(64)
    idle_gather_sums = _per_call_us(lambda: process_groups._gather(sums, None).sum(0), repeats=200)
    idle_all_reduce = _per_call_us(lambda: dist.all_reduce(sums.clone()), repeats=200)
    spent = {"seconds": 0.0}
    gather = process_groups._gather

    def timed_gather(tensor, group):
        start = time.perf_counter()
        result = gather(tensor, group)
        spent["seconds"] += time.perf_counter() - start
        return result

    process_groups._gather = timed_gather
    model = autosyncbn.convert_model(resnet_like(width=32, blocks=6))
    x = torch.randn(2, 3, 64, 64)
    steps, inside = [], []
    for round_ in range(8):
        spent["seconds"] = 0.0
        dist.barrier()
        start = time.perf_counter()
        model(x).square().mean().backward()
        if round_ >= 2:
            steps.append(time.perf_counter() - start)
            inside.append(spent["seconds"])
    process_groups._gather = gather
    if rank == 0:
        queue.put({"idle_gather_us": idle, "idle_gather_and_sum_64_us": idle_gather_sums,
                   "idle_all_reduce_64_us": idle_all_reduce, "step_ms": statistics.median(steps) * 1e3,
                   "inside_collectives_ms": statistics.median(inside) * 1e3, "collectives_per_step": 26})
    del model
    dist.barrier()
    dist.destroy_process_group()


def gloo() -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        processes = [context.Process(target=_gloo_rank, args=(r, 2, os.path.join(folder, "rdv"), queue))
                     for r in range(2)]
        for process in processes:
            process.start()
        figures = queue.get(timeout=300)
        for process in processes:
            process.join(60)
    print("3. gloo, 2 processes, medium CNN (32ch, 64px, 2 per rank; 26 collectives per step):")
    print(f"   all-gather of one record when idle {figures['idle_gather_us']:.0f} us; in a step of"
          f" {figures['step_ms']:.1f} ms, {figures['inside_collectives_ms']:.1f} ms inside the collectives"
          f" ({figures['inside_collectives_ms'] / 26 * 1e3:.0f} us each)")
    print(f"   backward's reduction of 64 values when idle: all-gather + sum"
          f" {figures['idle_gather_and_sum_64_us']:.0f} us, all-reduce {figures['idle_all_reduce_64_us']:.0f} us")
    return figures


def main() -> dict:
    result = {"kernels_us": kernels(), "replica_threads": replica_threads(), "gloo": gloo()}
    write_json("profile", result)
    return result


if __name__ == "__main__":
    main()
