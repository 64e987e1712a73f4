"""GPU (runs only with CUDA): real nn.DataParallel and two processes sharing the GPU.

1. nn.DataParallel with the device listed four times (or every GPU when there
   are several): a training step, synchronized vs unsynchronized BatchNorm.
2. Two processes over gloo on one GPU: a DDP training step with autosyncbn's
   layers vs torch.nn.SyncBatchNorm on the same model.
Prepared to fit the GPU check's window (``benchmarks/gpu_check.sh``). Writes
gpu.json to ``--output`` (default: results/).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autosyncbn  # noqa: E402
from autosyncbn.processes import run_ranks  # noqa: E402
from common import interleaved_medians, resnet_like, write_json  # noqa: E402


def _cuda_step(model: nn.Module, x: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        torch.cuda.synchronize()

    return step


def data_parallel(repeats: int) -> dict:
    count = torch.cuda.device_count()
    device_ids = list(range(count)) if count > 1 else [0, 0, 0, 0]
    rows = {}
    for width, image, per in [(64, 64, 8), (128, 128, 4)]:
        model = resnet_like(width=width, blocks=6).cuda()
        parallel = nn.DataParallel(model, device_ids=device_ids)
        x = torch.randn(per * len(device_ids), 3, image, image, device="cuda")
        step = _cuda_step(parallel, x)
        medians = interleaved_medians({"unsynchronized": step, "synchronized": step}, repeats,
                                      scopes={"synchronized": autosyncbn.patched})
        ratio = medians["synchronized"] / medians["unsynchronized"]
        key = f"{width}ch {image}px x{per}"
        rows[key] = {"medians_s": medians, "ratio": ratio, "device_ids": device_ids}
        print(f"  DataParallel {device_ids} {key}: unsynchronized {medians['unsynchronized'] * 1e3:7.2f} ms"
              f"   synchronized {medians['synchronized'] * 1e3:7.2f} ms   ratio {ratio:.3f}x")
    return rows


def _rank(rank: int, world: int, repeats: int) -> dict:
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    ours = nn.parallel.DistributedDataParallel(autosyncbn.convert_model(resnet_like(64, 6)).cuda())
    theirs = nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(resnet_like(64, 6)).cuda())
    x = torch.randn(8, 3, 64, 64, device="cuda")
    steps = {"autosyncbn": _cuda_step(ours, x), "nn.SyncBatchNorm": _cuda_step(theirs, x)}
    return interleaved_medians(steps, repeats, warmup=2, scopes={name: _in_step for name in steps})


@contextlib.contextmanager
def _in_step():
    dist.barrier()  # both ranks start each step together, outside the timed region
    yield


def two_processes(repeats: int) -> dict:
    medians = run_ranks(_rank, 2, repeats, deadline=300, pg_timeout=120)[0]
    ratio = medians["autosyncbn"] / medians["nn.SyncBatchNorm"]
    print(f"  2 processes on one GPU over gloo: nn.SyncBatchNorm {medians['nn.SyncBatchNorm'] * 1e3:7.2f} ms"
          f"   autosyncbn {medians['autosyncbn'] * 1e3:7.2f} ms   ratio {ratio:.3f}x")
    return {"medians_s": medians, "ratio": ratio}


def main(repeats: int = 20, output: "str | None" = None) -> dict:
    if not torch.cuda.is_available():
        print("GPU benchmark: no CUDA device here; skipped (figures unmeasured)")
        return {"skipped": "no CUDA device"}
    print(f"GPU benchmark on {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
    result = {"data_parallel": data_parallel(repeats)}
    try:
        result["two_processes"] = two_processes(repeats)
    except Exception as error:  # report, keep the DataParallel figures
        print(f"  2 processes on one GPU: failed: {type(error).__name__}: {error}")
        result["two_processes"] = {"error": f"{type(error).__name__}: {error}"}
    write_json("gpu", result, folder=output)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=None, help="folder for gpu.json (default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=20)
    arguments = parser.parse_args()
    main(arguments.repeats, arguments.output)
