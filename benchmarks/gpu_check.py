"""Correctness on a GPU: real nn.DataParallel against one device with the whole batch.

Run by ``benchmarks/gpu_check.sh`` (it also runs the CUDA tests and the GPU
benchmark). Each check prints one line and all go to ``gpu_check.json`` in
the folder given by ``--output``:

1. ``nn.DataParallel`` with the GPU listed four times (or every GPU), under
   ``install()`` and with the explicit classes; if PyTorch refuses a device
   listed twice, emulated replicas holding CUDA tensors, and it says which ran;
2. timm models whose BatchNorm is ``BatchNormAct2d`` (and a torchvision-style
   ResNet from timm), under ``install()``;
3. float16 and bfloat16 autocast.

TF32 is switched off so that float32 on the GPU is float32.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autosyncbn  # noqa: E402
from autosyncbn.testing import EmulatedDataParallel  # noqa: E402


def device_ids() -> list:
    count = torch.cuda.device_count()
    return list(range(count)) if count > 1 else [0, 0, 0, 0]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(expected.detach().abs().max().item(), 1.0)
    return (actual.detach().double() - expected.detach().double()).abs().max().item() / scale


def parallel_of(model: nn.Module, explicit: bool) -> tuple[nn.Module, str]:
    """Real DataParallel, or emulated CUDA replicas where PyTorch refuses the device list."""
    ids = device_ids()
    cls = autosyncbn.DataParallelWithCallback if explicit else nn.DataParallel
    try:
        probe = cls(copy.deepcopy(model), device_ids=ids)  # does PyTorch accept the list? (on a copy)
        with autosyncbn.patched() if not explicit else _nothing():
            probe(torch.randn(8, 3, 8, 8, device="cuda"))
        return cls(model, device_ids=ids), f"nn.DataParallel device_ids={ids}"
    except Exception as error:  # a device listed twice refused: emulate on the one GPU
        print(f"    DataParallel refused {ids}: {type(error).__name__}: {error}; using emulated CUDA replicas")
        from autosyncbn.testing import EmulatedDataParallelWithCallback

        emulated = EmulatedDataParallelWithCallback(model, 4) if explicit else EmulatedDataParallel(model, 4)
        emulated.src_device_obj = torch.device("cuda", 0)  # its replicas hold the model's CUDA tensors
        return emulated, "emulated replicas (threads) holding CUDA tensors"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8),
    )


def train_and_compare(model: nn.Module, explicit: bool, steps: int = 3, batch: int = 10,
                      image: int = 8, channels: int = 3) -> dict:
    torch.manual_seed(0)
    model = model.cuda()
    reference = copy.deepcopy(model)
    if explicit:
        model = autosyncbn.convert_model(model)
    parallel, route = parallel_of(model, explicit)
    errors: dict = {}
    with autosyncbn.patched() if not explicit else _nothing():
        for _ in range(steps):
            for m in (model, reference):
                m.zero_grad(set_to_none=True)
            x = torch.randn(batch, channels, image, image, device="cuda") * 2 + 1
            x_ref = x.clone().requires_grad_()
            x = x.requires_grad_()
            out, ref_out = parallel(x), reference(x_ref)
            target = torch.randn_like(ref_out)
            (out * target).sum().backward()
            (ref_out * target).sum().backward()
            found = {
                "output": relative_error(out, ref_out),
                "input grad": relative_error(x.grad, x_ref.grad),
                "param grads": max(relative_error(p.grad, q.grad) for p, q in
                                   zip(model.parameters(), reference.parameters()) if q.grad is not None),
                "buffers": max(relative_error(b.float(), c.float()) for b, c in
                               zip(model.buffers(), reference.buffers())),
            }
            for key, value in found.items():
                errors[key] = max(errors.get(key, 0.0), value)
    return {"route": route, "errors": errors, "ok": max(errors.values()) < 1e-3}


def timm_models() -> dict:
    import timm

    results = {}
    for name in ("efficientnet_b0", "regnetx_002", "resnet18"):
        model = timm.create_model(name, pretrained=False, num_classes=10)
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)})
        with autosyncbn.sync_report() as report:
            result = train_and_compare(model, explicit=False, steps=2, batch=8, image=64)
        result["batchnorm kinds"] = kinds
        result["synchronized layers"] = len(report.synchronized)
        result["per-slice layers"] = report.per_slice
        results[name] = result
    results["ok"] = all(r["ok"] for r in results.values() if isinstance(r, dict))
    return results


def autocast(dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = small_model().cuda()
    reference = copy.deepcopy(model)
    parallel, route = parallel_of(model, explicit=False)
    x = torch.randn(16, 3, 8, 8, device="cuda") * 3 + 1
    with autosyncbn.patched(), torch.autocast("cuda", dtype=dtype):
        out = parallel(x)
        ref_out = reference(x)
    return {
        "route": route, "output dtype": str(out.dtype), "reference dtype": str(ref_out.dtype),
        "output error": relative_error(out.float(), ref_out.float()),
        "running_var error": relative_error(model[1].running_var, reference[1].running_var),
        "ok": out.dtype == ref_out.dtype and relative_error(out.float(), ref_out.float()) < 5e-2,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="gpu_results", help="folder for gpu_check.json")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    if not torch.cuda.is_available():
        print("GPU check: no CUDA device here; skipped")
        return 0
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"GPU check on {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}")
    checks = {
        "DataParallel, install()": lambda: train_and_compare(small_model(), explicit=False),
        "DataParallel, explicit classes": lambda: train_and_compare(small_model(), explicit=True),
        "timm models, install()": timm_models,
        "float16 autocast": lambda: autocast(torch.float16),
        "bfloat16 autocast": lambda: autocast(torch.bfloat16),
    }
    results: dict = {}
    failed = False
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print(f"  {name}: {json.dumps(results[name], default=str)[:600]}")
        failed |= "error" in results[name] or results[name].get("ok") is False
    with open(os.path.join(args.output, "gpu_check.json"), "w") as handle:
        json.dump(results, handle, indent=2, default=str)
    print("GPU check:", "FAILED" if failed else "all match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
