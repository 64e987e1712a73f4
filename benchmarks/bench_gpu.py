"""GPU benchmark: autosyncbn beside the unsynchronized step, the barrier floor and the classic algorithm.

1. DataParallel: real ``nn.DataParallel`` with the one GPU listed four times
   (``device_ids=[0, 0, 0, 0]``; every GPU if PyTorch refuses a device listed
   twice; emulated replicas holding CUDA tensors if there is only one GPU and
   it is refused: the route is printed). In one run, training steps of four
   variants alternate (interleaved repetitions, medians):

   - ``unsynchronized``: plain ``nn.BatchNorm2d``, statistics per replica;
   - ``floor``: ``peers.BarrierBatchNorm2d``, a barrier of all replicas at
     every layer call, then per-replica BatchNorm: the cost of meeting at all;
   - ``classic``: ``peers.ClassicSyncBatchNorm2d``, the classic
     ``sync_batchnorm`` algorithm (replica 0 gathers sums through queues);
   - ``autosyncbn``: ``autosyncbn.patched()`` (what ``install()`` does) over
     the same plain-BatchNorm model.

   Sizes: the two toy sizes (``common.resnet_like``, 13 BatchNorm layers:
   64 ch 64 px x8 per replica, 128 ch 128 px x4 per replica) and a ResNet-50
   (torchvision's, or the bottleneck ResNet-50 below; 53 BatchNorm layers)
   at 160 px with 8 images per replica, or the largest that fits ``--budget``.
2. Processes: 2 processes on one GPU, DDP over gloo, ``autosyncbn.convert_model``
   vs ``nn.SyncBatchNorm``; NCCL with both ranks on the GPU only if
   ``nn.SyncBatchNorm`` fails over gloo and NCCL works (the backend is printed).

Every ratio names its direction: "autosyncbn / unsynchronized" is
autosyncbn's step time over the unsynchronized step time. Results go to
``gpu.json`` in ``--output`` (default ``benchmarks/results``), written after
every size, so a run cut short keeps what it measured.

``--cpu-smoke`` runs the same code on the CPU with tiny sizes and
``autosyncbn.testing.EmulatedDataParallel`` instead of real DataParallel: a
check of this script's logic, not a measurement (``gpu_smoke.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autosyncbn  # noqa: E402
from autosyncbn.processes import run_ranks  # noqa: E402
from autosyncbn.testing import EmulatedDataParallel  # noqa: E402
from common import RESULTS, interleaved_medians, machine, resnet_like  # noqa: E402
from peers import BarrierBatchNorm2d, ClassicSyncBatchNorm2d, with_batchnorm  # noqa: E402

VARIANTS = ("unsynchronized", "floor", "classic", "autosyncbn")
#: (label, numerator, denominator): each ratio is numerator's step time / denominator's.
RATIOS = (
    ("autosyncbn / unsynchronized", "autosyncbn", "unsynchronized"),
    ("floor / unsynchronized", "floor", "unsynchronized"),
    ("classic / unsynchronized", "classic", "unsynchronized"),
    ("autosyncbn / classic", "autosyncbn", "classic"),
)
#: autosyncbn's distance to the floor, in unsynchronized steps (the issue's target: within 0.15).
GAP = "autosyncbn / unsynchronized - floor / unsynchronized"


# --- running replicas: real DataParallel, or emulated ones -----------------------------------------

class _AsReplica:
    """Runs replica ``index`` in a thread named as ``autosyncbn.testing`` names replica threads.

    ``peers.ClassicSyncBatchNorm2d`` tells replicas apart by that name; the
    threads of PyTorch's ``parallel_apply`` are named otherwise, and with
    ``device_ids=[0, 0, 0, 0]`` every replica is on ``cuda:0``, so the index
    given at replicate time is the only reliable one.
    """

    def __init__(self, module: nn.Module, index: int) -> None:
        self.module, self.index = module, index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        threading.current_thread().name = f"autosyncbn-replica-{self.index}"
        return self.module(*args, **kwargs)


class _IndexedReplicas:
    """DataParallel mixin: every replica ``replicate`` makes runs as :class:`_AsReplica`."""

    def replicate(self, module: nn.Module, device_ids: Sequence[Any]) -> list:
        replicas = super().replicate(module, device_ids)  # type: ignore[misc]
        return [_AsReplica(replica, index) for index, replica in enumerate(replicas)]


class IndexedDataParallel(_IndexedReplicas, nn.DataParallel):
    """``nn.DataParallel`` whose replicas know their index (for the classic peer)."""


class IndexedEmulatedDataParallel(_IndexedReplicas, EmulatedDataParallel):
    """``EmulatedDataParallel`` whose replicas know their index (the same code path on CPU)."""


@dataclass(frozen=True)
class Parallel:
    """How the variants run in parallel: real DataParallel over ``device_ids``, or emulated replicas."""

    device: torch.device
    replicas: int
    device_ids: Optional[list]  # None: EmulatedDataParallel (threads, one device)
    route: str

    def wrap(self, module: nn.Module, indexed: bool = False) -> nn.Module:
        if self.device_ids is not None:
            cls = IndexedDataParallel if indexed else nn.DataParallel
            return cls(module, device_ids=self.device_ids)
        cls = IndexedEmulatedDataParallel if indexed else EmulatedDataParallel
        parallel = cls(module, self.replicas)
        parallel.src_device_obj = self.device  # emulated replicas may hold CUDA tensors
        return parallel


def choose_parallel(smoke: bool) -> Parallel:
    """The GPU listed 4 times if PyTorch accepts it, else every GPU, else emulated replicas on the GPU."""
    if smoke:
        return Parallel(torch.device("cpu"), 4, None, "EmulatedDataParallel, 4 CPU replicas (--cpu-smoke)")
    count = torch.cuda.device_count()
    candidates = [[0, 0, 0, 0]] + ([list(range(count))] if count > 1 else [])
    for ids in candidates:
        try:
            probe = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).cuda()
            nn.DataParallel(probe, device_ids=ids)(torch.randn(2 * len(ids), 3, 8, 8, device="cuda")).sum().backward()
            torch.cuda.synchronize()
            return Parallel(torch.device("cuda", 0), len(ids), ids, f"real nn.DataParallel, device_ids={ids}")
        except Exception as error:
            print(f"  nn.DataParallel refused device_ids={ids}: {type(error).__name__}: {error}")
    return Parallel(torch.device("cuda", 0), 4, None,
                    "EMULATED replicas (threads) holding CUDA tensors: PyTorch refused the GPU listed 4 times")


# --- models ------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck block (1x1, 3x3 with the stride, 1x1 x4; projection when needed)."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def resnet50(classes: int = 1000) -> tuple[nn.Module, str]:
    """torchvision's ResNet-50 if it imports, else the same network built here; and which one it is."""
    try:
        from torchvision.models import resnet50 as torchvision_resnet50

        return torchvision_resnet50(num_classes=classes), "torchvision ResNet-50"
    except Exception:  # not installed, or built against another PyTorch
        pass
    layers: list = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1)]
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if block == 0 else 1))
            inplanes = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, classes)]
    return nn.Sequential(*layers), "ResNet-50 (bottleneck, built here)"


def training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step (forward, loss, backward), waiting for the GPU to finish it."""
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def variant_models(base: nn.Module, parallel: Parallel) -> dict[str, nn.Module]:
    """The four variants, each its own copy of ``base`` (same weights), wrapped for ``parallel``."""
    replicas = parallel.replicas

    def copy_on_device(make: Optional[Callable[[int], nn.Module]] = None) -> nn.Module:
        model = copy.deepcopy(base)
        return (with_batchnorm(model, make) if make else model).to(parallel.device)

    return {
        "unsynchronized": parallel.wrap(copy_on_device()),
        "floor": parallel.wrap(copy_on_device(lambda channels: BarrierBatchNorm2d(channels, replicas))),
        "classic": parallel.wrap(copy_on_device(lambda channels: ClassicSyncBatchNorm2d(channels, replicas)),
                                 indexed=True),
        "autosyncbn": parallel.wrap(copy_on_device()),  # run inside autosyncbn.patched()
    }


SCOPES = {"autosyncbn": autosyncbn.patched}


# --- DataParallel measurements ----------------------------------------------------------------------

def _first_steps(steps: dict[str, Callable[[], None]]) -> tuple[dict, dict]:
    """One step of each variant (start-up costs, and failures caught): (the steps that ran, errors)."""
    ran, errors = {}, {}
    for name, step in steps.items():
        try:
            with SCOPES.get(name, contextlib.nullcontext)():
                step()
            ran[name] = step
        except torch.cuda.OutOfMemoryError:
            raise  # the size is too large: the caller tries a smaller one
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"
            print(f"    {name} failed: {errors[name]}")
    return ran, errors


def _round_seconds(steps: dict[str, Callable[[], None]]) -> float:
    """Seconds for one step of every variant (one interleaved round)."""
    start = time.perf_counter()
    for name, step in steps.items():
        with SCOPES.get(name, contextlib.nullcontext)():
            step()
    return time.perf_counter() - start


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """Each ratio of :data:`RATIOS` whose two variants were measured, plus autosyncbn's distance to the floor."""
    found = {label: medians[a] / medians[b] for label, a, b in RATIOS if a in medians and b in medians}
    if "autosyncbn / unsynchronized" in found and "floor / unsynchronized" in found:
        found[GAP] = found["autosyncbn / unsynchronized"] - found["floor / unsynchronized"]
    return found


def measure(base: nn.Module, parallel: Parallel, image: int, per_replica: int, repeats: int,
            budget_s: Optional[float] = None, min_repeats: int = 5) -> Optional[dict]:
    """Interleaved medians of the four variants at one size; None if ``budget_s`` cannot hold ``min_repeats``."""
    start = time.perf_counter()
    torch.manual_seed(0)
    x = torch.randn(per_replica * parallel.replicas, 3, image, image, device=parallel.device)
    steps = {name: training_step(model, x) for name, model in variant_models(base, parallel).items()}
    steps, errors = _first_steps(steps)
    if not steps:
        return {"errors": errors}
    round_s = _round_seconds(steps)  # also the warm-up round
    if budget_s is not None:
        left = budget_s - (time.perf_counter() - start)
        if left < min_repeats * round_s:
            return None
        repeats = max(min_repeats, min(repeats, int(left / round_s)))
    medians = interleaved_medians(steps, repeats, warmup=0, scopes=SCOPES)
    return {"medians_s": medians, "ratios": ratios(medians), "repeats": repeats,
            "images": tuple(x.shape), "errors": errors, "seconds": time.perf_counter() - start}


def data_parallel(parallel: Parallel, repeats: int, budget_s: float, smoke: bool,
                  save: Callable[[dict], None]) -> dict:
    """The toy sizes, then the ResNet-50 at the largest size that fits ``budget_s``."""
    rows: dict = {}
    toys = [(8, 8, 2), (16, 16, 1)] if smoke else [(64, 64, 8), (128, 128, 4)]
    for width, image, per in toys:
        key = f"{width}ch {image}px x{per} per replica"
        rows[key] = measure(resnet_like(width=width, blocks=6), parallel, image, per, repeats)
        _print_row(key, rows[key])
        save(rows)
    model, name = resnet50()
    image, sizes = (32, (2,)) if smoke else (160, (8, 4, 2))
    started = time.perf_counter()
    for per in sizes:  # the largest batch whose interleaved rounds fit the budget
        key = f"{name} {image}px x{per} per replica"
        why = f"does not fit the {budget_s:.0f} s budget"
        try:
            row = measure(model, parallel, image, per, repeats,
                          budget_s=budget_s - (time.perf_counter() - started), min_repeats=1 if smoke else 5)
        except torch.cuda.OutOfMemoryError as error:
            row, why = None, f"out of memory ({str(error).splitlines()[0][:200]})"
        if row is not None:
            rows[key] = row
            _print_row(key, row)
            break
        print(f"  {key}: {why}; fewer images per replica")
        if parallel.device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        rows[f"{name} {image}px"] = {"errors": {"all": f"no size fits {budget_s:.0f} s or the memory"}}
    save(rows)
    return rows


# --- 2 processes on one GPU ---------------------------------------------------------------------

@contextlib.contextmanager
def _in_step():
    dist.barrier()  # both ranks start each step together, outside the timed region
    yield


def _rank(rank: int, world: int, repeats: int, backend: str, device_type: str, smoke: bool) -> dict:
    """In each process: DDP steps of autosyncbn and nn.SyncBatchNorm over ``backend``, both ranks on GPU 0."""
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = None  # the world: gloo, as run_ranks made it
    if backend != "gloo":
        group = dist.new_group(backend=backend)
        dist.all_reduce(torch.ones(1, device=device), group=group)  # NCCL may refuse two ranks on one GPU
    torch.manual_seed(0)
    (width, blocks), image, per_rank = ((8, 2), 16, 4) if smoke else ((64, 6), 64, 8)
    base = resnet_like(width, blocks)
    converts = {
        "autosyncbn": lambda model: autosyncbn.convert_model(model, process_group=group),
        "nn.SyncBatchNorm": lambda model: nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group),
    }
    x = torch.randn(per_rank, 3, image, image, device=device)
    steps, errors = {}, {}
    for name, convert in converts.items():
        try:
            model = nn.parallel.DistributedDataParallel(convert(copy.deepcopy(base)).to(device), process_group=group)
            steps[name] = training_step(model, x)
            steps[name]()  # fails here if the backend or device is refused
        except Exception as error:
            steps.pop(name, None)
            errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    ran_everywhere = torch.tensor([name in steps for name in converts], dtype=torch.int32)
    dist.all_reduce(ran_everywhere, op=dist.ReduceOp.MIN)  # time only what ran on every rank
    steps = {name: steps[name] for name, ran in zip(converts, ran_everywhere.tolist()) if ran}
    medians = interleaved_medians(steps, repeats, warmup=2, scopes={name: _in_step for name in steps})
    return {"backend": backend, "medians_s": medians, "errors": errors}


def _processes_over(backend: str, repeats: int, device_type: str, smoke: bool, deadline: float) -> dict:
    try:
        return run_ranks(_rank, 2, repeats, backend, device_type, smoke, deadline=deadline, pg_timeout=60)[0]
    except Exception as error:  # a rank's own error is the last line of the message
        last = (str(error).strip().splitlines() or [""])[-1]
        return {"backend": backend, "medians_s": {}, "errors": {"all": f"{type(error).__name__}: {last}"[:500]}}


def two_processes(repeats: int, smoke: bool, deadline: float) -> dict:
    """autosyncbn vs nn.SyncBatchNorm, 2 processes on one GPU: gloo, or NCCL where only NCCL runs both."""
    device_type = "cpu" if smoke else "cuda"
    result = _processes_over("gloo", repeats, device_type, smoke, deadline)
    if "nn.SyncBatchNorm" not in result["medians_s"]:
        print(f"  over gloo nn.SyncBatchNorm did not run ({result['errors']}); trying NCCL, both ranks on GPU 0")
        nccl = _processes_over("nccl", repeats, device_type, smoke, deadline / 2)
        result["nccl attempt"] = nccl
        if "nn.SyncBatchNorm" in nccl["medians_s"] and "autosyncbn" in nccl["medians_s"]:
            result = {**nccl, "gloo attempt": {k: v for k, v in result.items() if k != "nccl attempt"}}
    medians = result["medians_s"]
    if "autosyncbn" in medians and "nn.SyncBatchNorm" in medians:
        result["autosyncbn / nn.SyncBatchNorm"] = medians["autosyncbn"] / medians["nn.SyncBatchNorm"]
    return result


# --- output ----------------------------------------------------------------------------------------------

def _ms(seconds: Optional[float]) -> str:
    return f"{seconds * 1e3:9.2f}" if seconds is not None else f"{'-':>9}"


def _print_row(key: str, row: dict) -> None:
    medians, found = row.get("medians_s", {}), row.get("ratios", {})
    times = " ".join(f"{name} {_ms(medians.get(name)).strip()} ms" for name in VARIANTS if name in medians)
    print(f"  {key}: {times or 'nothing measured'}")
    for label, value in found.items():
        print(f"      {label} = {value:.3f}")
    for name, error in row.get("errors", {}).items():
        print(f"      {name}: FAILED: {error}")


def _short(label: str) -> str:
    return "autosyncbn-floor" if label == GAP else label.replace(" / ", "/").replace("unsynchronized", "unsync")


def _print_data_parallel(route: str, rows: dict) -> None:
    """Median ms per training step of each variant, then the ratios (the first named's time / the second's)."""
    labels = [label for label, _, _ in RATIOS]
    width = max(len(key) for key in rows) + 2
    print(f"\nDataParallel ({route}), median ms per training step:")
    print(f"  {'size':<{width}}" + "".join(f"{name:>15}" for name in VARIANTS))
    for key, row in rows.items():
        medians = row.get("medians_s", {})
        print(f"  {key:<{width}}" + "".join(f"{_ms(medians.get(name)):>15}" for name in VARIANTS))
    print("  ratios of step times, the first named over the second (below 1: the first is faster);")
    print("  autosyncbn-floor = autosyncbn/unsync - floor/unsync:")
    print(f"  {'size':<{width}}" + "".join(f"{_short(label):>20}" for label in labels + [GAP]))
    for key, row in rows.items():
        found = row.get("ratios", {})
        cells = [f"{found[label]:.3f}" if label in found else "-" for label in labels]
        cells.append(f"{found[GAP]:+.3f}" if GAP in found else "-")
        print(f"  {key:<{width}}" + "".join(f"{cell:>20}" for cell in cells))


def _print_processes(processes: dict) -> None:
    medians, ratio = processes.get("medians_s", {}), processes.get("autosyncbn / nn.SyncBatchNorm")
    print(f"\n2 processes on one GPU over {processes.get('backend')}, median ms per DDP training step:"
          f" autosyncbn {_ms(medians.get('autosyncbn')).strip()},"
          f" nn.SyncBatchNorm {_ms(medians.get('nn.SyncBatchNorm')).strip()}")
    print("  autosyncbn step time / nn.SyncBatchNorm step time = "
          + (f"{ratio:.3f}" if ratio is not None else "- (not measured)"))
    for attempt in (processes, processes.get("nccl attempt") or {}, processes.get("gloo attempt") or {}):
        for name, error in attempt.get("errors", {}).items():
            print(f"      {name} over {attempt.get('backend')}: FAILED: {error}")


def print_table(result: dict) -> None:
    """The compact summary of what ``result`` holds (both parts, or the one that ran)."""
    if result.get("data_parallel"):
        _print_data_parallel(result.get("route", "?"), result["data_parallel"])
    if result.get("two_processes"):
        _print_processes(result["two_processes"])


class _Results:
    """``gpu.json`` in the folder: this run's parts replace those keys, the other parts are kept."""

    def __init__(self, folder: str, name: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{name}.json")
        self.data: dict = {}
        with contextlib.suppress(OSError, ValueError):
            with open(self.path) as handle:
                self.data = json.load(handle)

    def save(self, **parts: Any) -> None:
        self.data.update(parts, machine=machine(), written=time.strftime("%Y-%m-%d %H:%M:%S"))
        with open(self.path, "w") as handle:
            json.dump(self.data, handle, indent=2, default=str)


def main(repeats: int = 20, output: Optional[str] = None, part: str = "all", smoke: bool = False,
         budget_s: float = 60.0) -> dict:
    if not smoke and not torch.cuda.is_available():
        print("GPU benchmark: no CUDA device here; skipped (figures unmeasured). --cpu-smoke checks the logic.")
        return {"skipped": "no CUDA device"}
    if smoke:
        repeats = min(repeats, 3)
        output = output or os.path.join(tempfile.gettempdir(), "autosyncbn_gpu_smoke")
    results = _Results(output or RESULTS, "gpu_smoke" if smoke else "gpu")
    where = "CPU (--cpu-smoke)" if smoke else f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    print(f"GPU benchmark on {where}, torch {torch.__version__}, autosyncbn {autosyncbn.__version__}")
    result: dict = {}
    if part in ("all", "data-parallel"):
        parallel = choose_parallel(smoke)
        print(f"  DataParallel route: {parallel.route}; {repeats} interleaved repeats per size"
              f" (fewer for ResNet-50 if the {budget_s:.0f} s budget needs it)")
        result["route"] = parallel.route
        results.save(route=parallel.route, data_parallel={})
        try:
            result["data_parallel"] = data_parallel(parallel, repeats, budget_s, smoke,
                                                    save=lambda rows: results.save(data_parallel=rows))
        except Exception as error:  # keep what was measured; the processes still run
            traceback.print_exc()
            result["data_parallel_error"] = f"{type(error).__name__}: {error}"
            results.save(data_parallel_error=result["data_parallel_error"])
    if part in ("all", "processes"):
        result["two_processes"] = two_processes(repeats, smoke, deadline=60.0)
        results.save(two_processes=result["two_processes"])
    print_table({**results.data, **result})
    print(f"\nwritten: {results.path}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="folder for gpu.json (default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved repeats per size (default: 20)")
    parser.add_argument("--part", choices=("all", "data-parallel", "processes"), default="all",
                        help="which part to run (default: all); each updates its keys of gpu.json")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds for the ResNet-50 size, start-up included (default: 60)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the same code on CPU, tiny sizes, EmulatedDataParallel: checks the logic only")
    arguments = parser.parse_args()
    main(arguments.repeats, arguments.output, arguments.part, arguments.cpu_smoke, arguments.budget)
