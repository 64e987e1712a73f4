"""Run a function in N real processes over a process group, with a deadline: tests, benchmarks, CI.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, joins
them to a gloo (or NCCL) group through a file rendezvous, calls
``fn(rank, world_size, *args)`` in each, and returns the ranks' return values
in rank order. Any rank's exception is re-raised here; a rank still running
at the deadline is killed and a ``TimeoutError`` raised: nothing hangs.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, pg_timeout: float,
           leave_together: bool, backend: str, results: Any) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    results.put((rank, fn(rank, world_size, *args)))
    if leave_together:
        # A rank that tears gloo down while a peer still talks to it can abort the peer.
        dist.barrier()
        dist.destroy_process_group()
    # Gloo's worker threads can abort the process while the interpreter is torn
    # down (a known PyTorch issue at exit); a rank that passed leaves at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, deadline: float = 90.0,
              pg_timeout: float = 30.0, leave_together: bool = True, backend: str = "gloo") -> list:
    """``[fn(rank, world_size, *args) for every rank]``, each in its own process (``fn`` importable)."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        processes = mp.start_processes(
            _entry, args=(world_size, init_file, fn, args, pg_timeout, leave_together, backend, results),
            nprocs=world_size, join=False, start_method="spawn",
        )
        end = time.monotonic() + deadline
        try:
            while not processes.join(timeout=1.0):
                if time.monotonic() > end:
                    raise TimeoutError(f"ranks still running after {deadline}s")
        finally:
            for process in processes.processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
    returned = dict(results.get() for _ in range(world_size) if not results.empty())
    return [returned.get(rank) for rank in range(world_size)]
