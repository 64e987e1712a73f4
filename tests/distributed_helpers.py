"""Run a function in N real processes (gloo, or NCCL with GPUs), with a deadline and clean-up."""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn, args, pg_timeout: float,
           leave_together: bool, backend: str) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    fn(rank, world_size, *args)
    if leave_together:
        # A rank that tears gloo down while a peer still talks to it can abort the peer.
        dist.barrier()
        dist.destroy_process_group()
    # Gloo's worker threads can abort the process while the interpreter is torn
    # down (a known PyTorch issue at exit); a rank that passed leaves at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args, deadline: float = 90.0, pg_timeout: float = 30.0,
              leave_together: bool = True, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; re-raise any failure."""
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        context = mp.start_processes(
            _entry, args=(world_size, init_file, fn, args, pg_timeout, leave_together, backend),
            nprocs=world_size,
            join=False, start_method="spawn",
        )
        end = time.monotonic() + deadline
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > end:
                    raise TimeoutError(f"ranks still running after {deadline}s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
