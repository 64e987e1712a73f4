"""Run every benchmark and the demo, write results/*.json, and refresh the figures on the pages.

    python benchmarks/run_all.py            # CPU benchmarks + the demo (about 5 minutes on 2 cores)
    python benchmarks/run_all.py --no-demo  # benchmarks only
    python benchmarks/run_all.py --gpu      # also the GPU benchmark (needs CUDA)

Two blocks are written here and nowhere else: the benchmark table of
docs/benchmarks.md (between ``<!-- benchmarks:begin/end -->``) and the demo's
output in README.md (between ``<!-- demo:begin/end -->``, with docs/demo_curves.png).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_compile  # noqa: E402
import bench_gloo  # noqa: E402
import bench_gpu  # noqa: E402
import bench_layer  # noqa: E402
import bench_memory  # noqa: E402
import bench_numerics  # noqa: E402
import bench_patch_overhead  # noqa: E402
import bench_sync_cost  # noqa: E402
import count_calls  # noqa: E402
from common import machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BENCHMARKS_PAGE = os.path.join(ROOT, "docs", "benchmarks.md")


def table(results: dict) -> str:
    info = machine()
    rows = [f"Measured by `python benchmarks/run_all.py` on {info['cpu_count']} CPU cores, PyTorch "
            f"{info['torch']} (emulated replicas are threads on those cores).", "",
            "Every ratio is time (or bytes, or error) of the first named over the second: a step ratio is "
            "\"that variant's step / the unsynchronized step\".", "",
            "| what | measured | floor / peers | target |", "| --- | --- | --- | --- |"]
    patch = results["patch_overhead"]
    rows.append(f"| patch overhead, CNN outside DataParallel, installed / not | {patch['ratio']:.3f}x | | <= 1.02x |")
    for key, row in results["sync_cost"]["rows"].items():
        size, replicas = key.split("/")
        ratios, config = row["ratios"], row["config"]
        target = {"small/4": f"<= floor + 0.12x and <= 0.85x classic (autosyncbn / classic: "
                             f"{ratios['autosyncbn'] / ratios['classic']:.2f}x)",
                  "medium/4": "<= floor + 0.06x"}.get(key, "")
        rows.append(f"| step / unsynchronized step, {size} ({config['width']}ch, {config['image']}px, "
                    f"{config['per_replica']}/replica), {replicas} replicas | {ratios['autosyncbn']:.3f}x | "
                    f"floor {ratios['floor']:.3f}x, split floor {ratios['split floor']:.3f}x, "
                    f"classic {ratios['classic']:.3f}x | {target} |")
    calls = results["calls"]["per_replica_call"]

    def forward_backward(name: str) -> str:
        return f"{calls[name]['forward']:.0f} / {calls[name]['backward']:.0f}"

    goal = results["calls"]["target"]
    rows.append(f"| Python calls per synchronized replica-call, forward / backward | "
                f"{forward_backward('autosyncbn')} | floor {forward_backward('floor')}, "
                f"classic {forward_backward('classic')} | <= {goal['forward']} / <= {goal['backward']} |")
    for label, row in results["layer"]["by_shape"].items():
        rows.append(f"| one layer fwd+bwd, autosyncbn / nn.BatchNorm, {label} | {row['ratio']:.2f}x | | <= 1.5x |")
    for label, row in results["memory"]["by_shape"].items():
        rows.append(f"| memory saved for backward, autosyncbn / nn.BatchNorm, {label}: activation-sized / all bytes | "
                    f"{row['ratio']:.3f}x / {row['ratio_all_bytes']:.4f}x | | <= 1.0x + vectors |")
    by_mean = results["numerics"]["by_mean"]
    worst = max(by_mean.values(), key=lambda r: r["ratio"])
    naive = max(r["naive"] for r in by_mean.values())
    rows.append(f"| numeric error, autosyncbn / PyTorch's own, worst over means 0..3e4 | {worst['ratio']:.2f}x | "
                f"naive sum/sum-of-squares up to {naive:.1e} abs. | <= 2x |")
    gloo = results["gloo"]
    peer = gloo['ratios']['all-reduce peer']
    rows.append(f"| DDP step over gloo, 2 processes, synchronized / local | {gloo['ratio']:.3f}x | "
                f"collective floor {gloo['floor']:.3f}x, all-reduce peer {peer:.3f}x "
                f"| <= 0.97x the peer (autosyncbn / peer: {gloo['ratio'] / peer:.2f}x) |")
    compiled = results["compile"]
    ratios = compiled["ratios"]
    rows.append(f"| torch.compile ({compiled['backend']}, fullgraph) training step over gloo, 2 processes, "
                f"compiled synchronized / compiled local | {ratios['compiled synchronized / compiled local']:.3f}x | "
                f"eager synchronized / eager local {ratios['eager synchronized / eager local']:.3f}x; "
                f"compiled / eager synchronized {ratios['compiled synchronized / eager synchronized']:.3f}x; "
                f"{compiled['graphs']} graph, {compiled['graph_breaks']} graph breaks | <= the eager ratio, 0 breaks |")
    return "\n".join(rows)


def run_demo() -> str:
    """The demo as a new user runs it; its closing lines, and its plot copied to docs/."""
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-m", "autosyncbn", "demo", "--output", folder],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        shutil.copy(os.path.join(folder, "curves.png"), os.path.join(ROOT, "docs", "demo_curves.png"))
    summary = done.stdout.split("\n\n")[-1].splitlines()  # the closing block, after the progress lines
    lines = [line for line in summary if not line.startswith("plot ")]
    print("\n".join(lines))
    return "```\n" + "\n".join(lines) + "\n```"


def refresh_block(path: str, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` (which must have them)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(path) as handle:
        page = handle.read()
    if begin not in page or end not in page:
        raise SystemExit(f"{os.path.relpath(path, ROOT)} has no {begin} ... {end} block to refresh")
    page = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{text}\n{end}", page, flags=re.S)
    with open(path, "w") as handle:
        handle.write(page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmark")
    parser.add_argument("--no-demo", action="store_true", help="leave the demo block as it is")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md and docs/benchmarks.md as they are")
    args = parser.parse_args()
    results = {
        "patch_overhead": bench_patch_overhead.main(),
        "sync_cost": bench_sync_cost.main(),
        "calls": count_calls.main(),
        "layer": bench_layer.main(),
        "memory": bench_memory.main(),
        "numerics": bench_numerics.main(),
        "gloo": bench_gloo.main(),
        "compile": bench_compile.main(),
    }
    if args.gpu:
        bench_gpu.main()
    if not args.no_readme:
        refresh_block(BENCHMARKS_PAGE, "benchmarks", table(results))
        if not args.no_demo:
            refresh_block(README, "demo", run_demo())
        print(f"figures refreshed: {README}, {BENCHMARKS_PAGE}")


if __name__ == "__main__":
    main()
