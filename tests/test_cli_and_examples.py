"""The demo, the self-check and every example run as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autosyncbn.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_with_small_settings(tmp_path, capsys):
    assert main(["demo", "--replicas", "4", "--per-replica", "4", "--epochs", "1",
                 "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed and "after the first step" in printed
    assert "move with the seed, the machine, the intra-op thread count and the load" in printed
    history = json.loads((tmp_path / "history.json").read_text())["runs"][0]
    assert "nudged by 1e-7" in printed and len(history["baseline_logit_difference"]) == 1
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # One step in, the synchronized model is the reference model up to float32 round-off.
    assert history["first_step_logit_difference"] < 1e-4
    for run in ("reference", "per-replica", "autosyncbn"):
        assert len(history[run]["test_accuracy"]) == 1


def test_demo_over_seeds_prints_mean_and_spread(tmp_path, capsys):
    assert main(["demo", "--replicas", "2", "--per-replica", "8", "--epochs", "1", "--seeds", "2",
                 "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy over 2 seeds, mean +- standard deviation" in printed
    runs = json.loads((tmp_path / "history.json").read_text())["runs"]
    assert [run["setting"]["seed"] for run in runs] == [0, 1]
    assert all(run["first_step_logit_difference"] < 1e-4 for run in runs)


def test_check_passes_and_prints_a_table(capsys):
    assert main(["check", "--replicas", "3", "--batch", "7"]) == 0
    printed = capsys.readouterr().out
    for row in ("output", "input grad", "weight grad", "bias grad", "running_mean", "running_var", "all match"):
        assert row in printed
    # Which layers synchronized, and why the one in eval mode did not.
    assert "synchronized: 3 replicas" in printed and "eval mode" in printed


def test_check_fails_on_a_mismatch(capsys, monkeypatch):
    from autosyncbn.tools import check

    monkeypatch.setattr(check.patching, "patched", __import__("contextlib").nullcontext)
    assert main(["check", "--replicas", "3", "--batch", "7"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


NO_SAMPLE = "with no sample there is nothing to compare"


@pytest.mark.parametrize("arguments,message", [
    (["check", "--replicas", "0"], "argument --replicas: must be at least 1, got 0"),
    (["check", "--replicas", "2.5"], "argument --replicas: expected a whole number of replicas, got '2.5'"),
    (["check", "--batch", "0"], f"argument --batch: must be at least 1, got 0: {NO_SAMPLE}"),
    (["check", "--batch", "-4"], f"argument --batch: must be at least 1, got -4: {NO_SAMPLE}"),
    (["check", "--tolerance", "-1"], "argument --tolerance: must be a finite number >= 0, got -1"),
    (["check", "--tolerance", "nan"], "argument --tolerance: must be a finite number >= 0, got nan"),
    (["check", "--tolerance", "inf"], "argument --tolerance: must be a finite number >= 0, got inf"),
    (["demo", "--replicas", "0"], "argument --replicas: must be at least 1, got 0"),
    (["demo", "--per-replica", "1"], "argument --per-replica: must be at least 2, got 1: the per-replica run's "
                                     "BatchNorm1d cannot normalize one value per channel in training"),
    (["demo", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
])
def test_values_that_cannot_run_are_usage_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: python -m autosyncbn " + arguments[0])
    assert error.splitlines()[-1] == f"python -m autosyncbn {arguments[0]}: error: {message}"


def test_check_accepts_one_replica_and_a_batch_of_one(capsys):
    """Either runs one replica, on PyTorch's own path, and matches one device."""
    assert main(["check", "--replicas", "3", "--batch", "1"]) == 0
    printed = capsys.readouterr().out
    assert "a batch of 1 runs only 1 replica(s)" in printed and "a single replica" in printed
    assert main(["check", "--replicas", "1", "--batch", "4"]) == 0
    assert "all match" in capsys.readouterr().out


def test_a_bad_value_exits_2_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "autosyncbn", "check", "--batch", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: argument --batch: must be at least 1, got 0" in result.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name != "ddp_cpu.py"))
def test_example_runs(example):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / example)], cwd=ROOT,
                            capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


@pytest.mark.timeout(120)
def test_the_readmes_ci_example_passes_with_the_plugin():
    """The complete test file of the README's CI section, run as a user runs it."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "ci" / "test_model_on_cpu_replicas.py").read_text()
    body = example.split('"""', 2)[2].strip()
    assert body in readme, "the README's CI example and examples/ci must be the same file"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "examples" / "ci")], cwd=ROOT / "examples" / "ci",
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "2 passed" in result.stdout


@pytest.mark.timeout(300)
def test_ddp_example_runs_under_torchrun():
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "ddp_cpu.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    gap = float(result.stdout.strip().splitlines()[-1].rsplit("=", 1)[1])
    assert gap < 1e-5
