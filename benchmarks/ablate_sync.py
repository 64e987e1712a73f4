"""Which part of a synchronized call costs what: each part replaced by a stand-in (timing only).

The "small" 4-replica step of bench_sync_cost.py under autosyncbn, with one
part of the synchronized call replaced at a time by a stand-in that does
(almost) nothing. The numbers are then wrong; only the time matters:

- ``no merge``: Chan's merge returns part 0's moments;
- ``no merge node``: ``_MergeStatistics`` hands out plain copies (no autograd node);
- ``no normalize node``: ``_Normalize`` is PyTorch's eval kernel (no autograd node);
- ``none of them``: all three at once.

Beside them: the unsynchronized step, the barrier floor and the split floor
(statistics kernel, barrier, normalization kernel). Prints the forward and the
whole step in ms over the unsynchronized ones. What is left over the split
floor once all three are gone is the rest of the per-call Python: the
decision, the exchange and the meeting. Writes nothing.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager
from unittest import mock

import torch

import autosyncbn
from autosyncbn import functional
from bench_sync_cost import SIZES, variants
from common import interleaved_medians, resnet_like, training_step


def _first_part(counts, moments, dtype):
    return moments[0].to(dtype, copy=True)


def _copies(call, *inputs_and_weights):
    inputs = inputs_and_weights[:len(inputs_and_weights) // 2]
    return (*inputs, *(call.merged.clone() for _ in inputs))


def _eval_kernel(input, stats, weight, bias, call, part):
    mean, variance = call.statistics(input.device)
    return torch.native_batch_norm(input, weight, bias, mean, variance, False, 0.0, call.kernel_eps)[0]


STAND_INS = {
    "no merge": [(functional, "chan_merge", _first_part)],
    "no merge node": [(functional._MergeStatistics, "apply", _copies)],
    "no normalize node": [(functional._Normalize, "apply", _eval_kernel)],
}
STAND_INS["none of them"] = [change for changes in STAND_INS.values() for change in changes]


@contextlib.contextmanager
def _patched_with(changes) -> ContextManager:
    with autosyncbn.patched(), contextlib.ExitStack() as stack:
        for owner, name, stand_in in changes:
            stack.enter_context(mock.patch.object(owner, name, stand_in))
        yield


def main(repeats: int = 20, replicas: int = 4, size: str = "small") -> dict:
    torch.manual_seed(0)
    config = SIZES[size]
    x = torch.randn(config["per_replica"] * replicas, 3, config["image"], config["image"])
    models = variants(resnet_like(width=config["width"], blocks=6), replicas)
    del models["classic"]
    runs = dict(models, **{name: models["autosyncbn"] for name in STAND_INS})
    scopes: dict[str, Callable[[], ContextManager]] = {}
    candidates = {}
    for name, model in runs.items():
        scope = (functools.partial(_patched_with, STAND_INS[name]) if name in STAND_INS
                 else autosyncbn.patched if name == "autosyncbn" else None)
        for what, run in (("forward", functools.partial(model, x)), ("step", training_step(model, x))):
            candidates[f"{name}/{what}"] = run
            if scope is not None:
                scopes[f"{name}/{what}"] = scope
    medians = interleaved_medians(candidates, repeats, scopes=scopes)
    base = {what: medians[f"unsynchronized/{what}"] for what in ("forward", "step")}
    print(f"{size} size, {replicas} replicas: ms over the unsynchronized forward ({base['forward'] * 1e3:.1f} ms)"
          f" and step ({base['step'] * 1e3:.1f} ms); stand-ins give wrong numbers, only time counts")
    extra = {}
    for name in runs:
        if name == "unsynchronized":
            continue
        extra[name] = {what: (medians[f"{name}/{what}"] - base[what]) * 1e3 for what in base}
        print(f"  {name:<18} forward {extra[name]['forward']:+7.2f} ms   step {extra[name]['step']:+7.2f} ms")
    return extra


if __name__ == "__main__":
    main()
