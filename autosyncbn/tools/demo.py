"""``python -m autosyncbn demo``: the problem and the fix, on real data.

Trains one small CNN on scikit-learn's 8x8 digits three ways, from the same
initial weights and on the same batches (plus a round-off baseline: the
reference again from weights nudged by 1e-7):

- ``reference``: one device, the whole batch, plain BatchNorm;
- ``per-replica``: N replicas, plain BatchNorm (each normalizes its own slice);
- ``autosyncbn``: N replicas after ``autosyncbn.install()``.

Replicas are real GPUs when CUDA is present, emulated CPU replicas otherwise.
It prints what it measures, whatever that is.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from .. import patching
from .check import count_argument
from .testing import EmulatedDataParallel

RUNS = ("reference", "per-replica", "autosyncbn")
BASELINE = "reference nudged by 1e-7"
"""Trained like the reference from weights nudged by 1e-7: how far float32 round-off alone drifts."""


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )


def load_digits_tensors(seed: int) -> tuple:
    """scikit-learn's digits (shipped inside the package, no download), split 80/20."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def make_parallel(model: nn.Module, replicas: int) -> nn.Module:
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return nn.DataParallel(model, device_ids=[i % count for i in range(replicas)])
    return EmulatedDataParallel(model, replicas)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple:
    model.eval()
    with torch.no_grad():
        logits = model(images.to(device))
        loss = nn.functional.cross_entropy(logits, labels.to(device)).item()
        accuracy = (logits.argmax(1).cpu() == labels).float().mean().item()
    model.train()
    return loss, accuracy, logits.cpu()


def train_three_ways(replicas: int, per_replica: int, epochs: int, seed: int, lr: float = 0.05,
                     progress: Callable = lambda iterable, **_: iterable, report: Callable = print) -> dict:
    """Train the reference, per-replica and synchronized models; return their histories."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits_tensors(seed)
    initial = build_model().to(device)
    models = {name: copy.deepcopy(initial) for name in (*RUNS, BASELINE)}
    with torch.no_grad():  # the round-off baseline: the reference, nudged by 1e-7
        for parameter in models[BASELINE].parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-7)
    runners = {
        "reference": models["reference"],
        "per-replica": make_parallel(models["per-replica"], replicas),
        "autosyncbn": make_parallel(models["autosyncbn"], replicas),
        BASELINE: models[BASELINE],
    }
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for name, m in models.items()}
    batch = replicas * per_replica
    history: dict = {name: {"train_loss": [], "test_loss": [], "test_accuracy": []} for name in RUNS}
    history["max_logit_difference"] = []
    history["baseline_logit_difference"] = []
    history["first_step_logit_difference"] = None
    steps_per_epoch = len(train_y) // batch
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed + epoch))
        sums = dict.fromkeys(runners, 0.0)
        for step in progress(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", leave=False):
            index = order[step * batch:(step + 1) * batch]
            x, y = train_x[index].to(device), train_y[index].to(device)
            for name in runners:
                scope = patching.patched() if name == "autosyncbn" else contextlib.nullcontext()
                with scope:
                    loss = nn.functional.cross_entropy(runners[name](x), y)
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                sums[name] += loss.item()
            if history["first_step_logit_difference"] is None:
                history["first_step_logit_difference"] = _logit_difference(models, test_x, device)
        logits = {}
        for name in runners:
            test_loss, accuracy, logits[name] = evaluate(models[name], test_x, test_y, device)
            if name in RUNS:
                history[name]["train_loss"].append(sums[name] / steps_per_epoch)
                history[name]["test_loss"].append(test_loss)
                history[name]["test_accuracy"].append(accuracy)
        history["max_logit_difference"].append(
            (logits["autosyncbn"] - logits["reference"]).abs().max().item()
        )
        history["baseline_logit_difference"].append(
            (logits[BASELINE] - logits["reference"]).abs().max().item()
        )
        report(format_epoch(epoch, history))
    history["max_parameter_difference"] = max(
        (p - q).abs().max().item()
        for p, q in zip(models["autosyncbn"].state_dict().values(), models["reference"].state_dict().values())
        if p.is_floating_point()
    )
    history["setting"] = {"replicas": replicas, "per_replica": per_replica, "epochs": epochs, "seed": seed,
                          "device": str(device), "steps_per_epoch": steps_per_epoch}
    return history


def _logit_difference(models: dict, images: torch.Tensor, device: torch.device) -> float:
    """Largest |autosyncbn - reference| of eval-mode logits on ``images``."""
    with torch.no_grad():
        logits = {}
        for name in ("autosyncbn", "reference"):
            models[name].eval()
            logits[name] = models[name](images.to(device))
            models[name].train()
    return (logits["autosyncbn"] - logits["reference"]).abs().max().item()


def format_epoch(epoch: int, history: dict) -> str:
    cells = "  ".join(
        f"{name:>11}: loss {history[name]['train_loss'][-1]:.4f} acc {history[name]['test_accuracy'][-1]:6.2%}"
        for name in RUNS
    )
    return f"epoch {epoch:>2}  {cells}  |sync-ref| {history['max_logit_difference'][-1]:.2e}"


def plot(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting = history["setting"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(1, setting["epochs"] + 1)
    for name, style in zip(RUNS, ("-", ":", "--")):
        left.plot(epochs, history[name]["train_loss"], style, marker="o", label=name)
        right.plot(epochs, [100 * a for a in history[name]["test_accuracy"]], style, marker="o", label=name)
    left.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    right.set(title="test accuracy (eval mode)", xlabel="epoch", ylabel="%")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(
        f"digits, {setting['replicas']} replicas x {setting['per_replica']} samples "
        f"({setting['device']}): synchronized vs one device vs per-replica BatchNorm"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> str:
    """What the demo ran on, for the timing line."""
    if torch.cuda.is_available():
        where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        where = f"{os.cpu_count()} CPU cores ({platform.machine()}), emulated replicas"
    return f"{where}, PyTorch {torch.__version__}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``demo``; values that cannot run end in a usage error (exit code 2).

    ``--per-replica`` needs 2: the per-replica run normalizes each slice alone,
    and its ``BatchNorm1d`` cannot normalize one value per channel in training.
    """
    parser.add_argument("--replicas", type=count_argument("replicas"), default=8, help="replicas (default 8)")
    one_value = ": the per-replica run's BatchNorm1d cannot normalize one value per channel in training"
    parser.add_argument("--per-replica", type=count_argument("samples", minimum=2, why=one_value),
                        default=2, help="samples per replica (default 2, the least)")
    parser.add_argument("--epochs", type=count_argument("epochs"), default=8, help="epochs (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=count_argument("seeds"), default=1,
                        help="seeds to train and summarize (default 1; accuracies move with the seed)")
    parser.add_argument("--output", default="autosyncbn_demo", help="folder for the plot and JSON")


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    print(f"Training on digits: {args.replicas} replicas x {args.per_replica} samples, "
          f"{args.epochs} epochs, {args.seeds} seed(s) "
          f"({'CUDA' if torch.cuda.is_available() else 'emulated CPU replicas'})")
    histories = [train_three_ways(args.replicas, args.per_replica, args.epochs, args.seed + offset,
                                  progress=tqdm, report=tqdm.write) for offset in range(args.seeds)]
    history = histories[0]
    os.makedirs(args.output, exist_ok=True)
    plot_path = os.path.join(args.output, "curves.png")
    plot(history, plot_path)
    seconds = time.perf_counter() - started
    with open(os.path.join(args.output, "history.json"), "w") as handle:
        json.dump({"seconds": seconds, "threads": torch.get_num_threads(), "runs": histories}, handle, indent=2)
    print()
    print(format_summary(histories))
    print(f"plot (seed {args.seed}): {plot_path}   data: {os.path.join(args.output, 'history.json')}")
    print(f"time: {seconds:.0f} s on {machine_description()}, {torch.get_num_threads()} intra-op threads")
    return 0


def format_summary(histories: list) -> str:
    """What does not move (the first step), then what does (final accuracies), said as such."""
    first = max(h["first_step_logit_difference"] for h in histories)
    seeds = len(histories)
    lines = [f"after the first step, |autosyncbn - reference| of test logits: {first:.2e} "
             f"(largest over {seeds} seed(s)): the synchronization itself, which does not move"]
    if seeds == 1:
        lines.append("final test accuracy:  " + "  ".join(
            f"{name} {history_accuracy(histories[0], name):.2%}" for name in RUNS))
    else:
        lines.append(f"final test accuracy over {seeds} seeds, mean +- standard deviation (min .. max):")
        for name in RUNS:
            values = [history_accuracy(h, name) for h in histories]
            lines.append(f"  {name:<12} {statistics.mean(values):6.2%} +- {statistics.stdev(values):5.2%} "
                         f"({min(values):.2%} .. {max(values):.2%})")
    lines.append(
        f"final accuracies move with the seed, the machine, the intra-op thread count and the load: "
        f"float32 round-off grows over {len(histories[0]['max_logit_difference'])} epochs of SGD (a reference "
        f"whose initial weights were nudged by 1e-7 ends "
        f"{max(h['baseline_logit_difference'][-1] for h in histories):.2e} away from it in test logits, "
        f"autosyncbn {max(h['max_logit_difference'][-1] for h in histories):.2e}). Compare runs of one "
        f"machine, over seeds (--seeds N), not single figures across machines.")
    return "\n".join(lines)


def history_accuracy(history: dict, name: str) -> float:
    return history[name]["test_accuracy"][-1]
