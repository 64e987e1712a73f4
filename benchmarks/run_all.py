"""Run every benchmark, write results/*.json, and refresh the table in README.md.

    python benchmarks/run_all.py            # all CPU benchmarks (a few minutes on 2 cores)
    python benchmarks/run_all.py --gpu      # also the GPU benchmark (needs CUDA)
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gloo  # noqa: E402
import bench_gpu  # noqa: E402
import bench_layer  # noqa: E402
import bench_memory  # noqa: E402
import bench_numerics  # noqa: E402
import bench_patch_overhead  # noqa: E402
import bench_sync_cost  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def table(results: dict) -> str:
    rows = ["| what | measured | target |", "| --- | --- | --- |"]
    patch = results["patch_overhead"]
    rows.append(f"| patch overhead, CNN outside DataParallel | {patch['ratio']:.3f}x | <= 1.02x |")
    for key, row in results["sync_cost"]["rows"].items():
        size, replicas = key.split("/")
        config = row["config"]
        target = "<= 1.10x" if replicas == "4" else ""
        rows.append(f"| synchronized step, {size} ({config['width']}ch, {config['image']}px, "
                    f"{config['per_replica']}/replica), {replicas} replicas | {row['ratio']:.3f}x | {target} |")
    for label, row in results["layer"]["by_shape"].items():
        rows.append(f"| one layer fwd+bwd, {label} | {row['ratio']:.2f}x | <= 1.5x |")
    for label, row in results["memory"]["by_shape"].items():
        rows.append(f"| memory saved for backward {label}: activation-sized / all bytes | "
                    f"{row['ratio']:.3f}x / {row['ratio_all_bytes']:.4f}x | <= 1.0x + vectors |")
    worst = max(results["numerics"]["by_mean"].values(), key=lambda r: r["ratio"])
    rows.append(f"| numeric error vs PyTorch's own, worst over means 0..3e4 | {worst['ratio']:.2f}x "
                f"(naive sum/sum-of-squares up to {max(r['naive'] for r in results['numerics']['by_mean'].values()):.1e} abs.) | <= 2x |")
    gloo = results["gloo"]
    rows.append(f"| DDP step over gloo, 2 processes, synchronized / local | {gloo['ratio']:.3f}x | <= 1.25x |")
    return "\n".join(rows)


def refresh_readme(text: str) -> None:
    with open(README) as handle:
        readme = handle.read()
    block = f"{BEGIN}\n{text}\n{END}"
    readme = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    with open(README, "w") as handle:
        handle.write(readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmark")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    args = parser.parse_args()
    results = {
        "patch_overhead": bench_patch_overhead.main(),
        "sync_cost": bench_sync_cost.main(),
        "layer": bench_layer.main(),
        "memory": bench_memory.main(),
        "numerics": bench_numerics.main(),
        "gloo": bench_gloo.main(),
    }
    if args.gpu:
        bench_gpu.main()
    if not args.no_readme:
        refresh_readme(table(results))
        print(f"README table refreshed: {README}")


if __name__ == "__main__":
    main()
