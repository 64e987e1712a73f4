"""torch.compile over gloo: a compiled synchronized training step beside compiled and eager peers.

2 processes, the ResNet-style CNN of bench_gloo.py (13 BatchNorm layers),
steps of every variant alternating inside the same processes
(``common.interleaved_medians``):

- ``compiled synchronized``: ``torch.compile(convert_model(model), fullgraph=True)``: one graph,
  the synchronization inside it (autosyncbn's ``sync_moments`` / ``sum_over_ranks`` operators);
- ``compiled local``: ``torch.compile(model, fullgraph=True)`` with nn.BatchNorm;
- ``eager synchronized`` and ``eager local``: the same, uncompiled.

Ratios are "A time / B time". Target: compiled synchronized / compiled local at most eager
synchronized / eager local (the synchronization costs no more inside a graph than outside).
Also prints the graphs and graph breaks ``torch._dynamo.explain`` finds in the synchronized
model. Writes results/compile.json.

    python benchmarks/bench_compile.py [--backend inductor|aot_eager|eager] [--repeats N]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autosyncbn  # noqa: E402
from autosyncbn.processes import run_ranks  # noqa: E402
from bench_gloo import LAYER_CALLS, SIZE  # noqa: E402  (the same model and batch)
from common import interleaved_medians, ranks_in_step, resnet_like, training_step, write_json  # noqa: E402


def _rank(rank: int, world: int, backend: str, repeats: int) -> dict:
    # The cores shared out, as torchrun does (OMP_NUM_THREADS=1 by default): ranks that
    # oversubscribe the cores wait at every collective for a peer descheduled by the other.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    base = resnet_like(width=SIZE["width"], blocks=6)
    synchronized = autosyncbn.convert_model(copy.deepcopy(base))
    local = copy.deepcopy(base)
    x = torch.randn(SIZE["per_rank"], 3, SIZE["image"], SIZE["image"])
    explained = torch._dynamo.explain(synchronized)(x)
    torch._dynamo.reset()
    models = {
        "compiled synchronized": torch.compile(synchronized, fullgraph=True, backend=backend),
        "compiled local": torch.compile(local, fullgraph=True, backend=backend),
        "eager synchronized": autosyncbn.convert_model(copy.deepcopy(base)),
        "eager local": copy.deepcopy(base),
    }
    steps = {name: training_step(model, x) for name, model in models.items()}
    medians = interleaved_medians(steps, repeats, warmup=3, scopes=dict.fromkeys(steps, ranks_in_step))
    return {"medians_s": medians, "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count}


def main(backend: str = "inductor", repeats: int = 12, world: int = 2) -> dict:
    measured = run_ranks(_rank, world, backend, repeats, deadline=900, pg_timeout=600)[0]
    medians = measured["medians_s"]
    ratios = {
        "compiled synchronized / compiled local": medians["compiled synchronized"] / medians["compiled local"],
        "eager synchronized / eager local": medians["eager synchronized"] / medians["eager local"],
        "compiled synchronized / eager synchronized": medians["compiled synchronized"] / medians["eager synchronized"],
        "compiled local / eager local": medians["compiled local"] / medians["eager local"],
    }
    print(f"torch.compile ({backend}) over gloo: training step, {world} processes x {SIZE['per_rank']} samples,"
          f" ResNet-style CNN ({SIZE['width']}ch, {SIZE['image']}px, {LAYER_CALLS} BatchNorm)")
    print(f"  synchronized model: {measured['graphs']} graph(s), {measured['graph_breaks']} graph break(s)")
    print("  " + "   ".join(f"{name} {medians[name] * 1e3:.2f} ms" for name in medians))
    for name, ratio in ratios.items():
        print(f"  {name}: {ratio:.3f}x")
    result = {"backend": backend, "medians_s": medians, "ratios": ratios, "graphs": measured["graphs"],
              "graph_breaks": measured["graph_breaks"], "size": SIZE, "world": world}
    write_json("compile", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--repeats", type=int, default=12)
    options = parser.parse_args()
    main(options.backend, options.repeats)
