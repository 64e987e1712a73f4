"""autosyncbn.lightning: Lightning's Trainer on 2 CPU processes (gloo) equals one process with the global batch.

Each rank sees a fixed half of every global batch (no DistributedSampler); the
reference is a plain model trained in this process on the whole batches with the
mean loss (Lightning's DDP averages gradients over ranks). The ``ddp`` strategy
re-executes the running script for its other ranks, so that test runs this file
as a script: ``python tests/test_lightning.py ddp OUT``.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("lightning", reason="the Lightning plugin needs `pip install autosyncbn[lightning]`")
import lightning.pytorch as pl  # noqa: E402

from autosyncbn.lightning import AutoSyncBatchNorm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, GLOBAL_BATCH, LR = 3, 8, 0.1
TRAINER = dict(accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a ``_BatchNorm`` subclass whose own forward calls ``F.batch_norm``, then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return F.relu(x)


def make_net() -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights in every process
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), BatchNormAct2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5),
    )


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=generator) * 2 + 3,
             torch.randint(0, 5, (GLOBAL_BATCH,), generator=generator)) for _ in range(STEPS)]


class LitNet(pl.LightningModule):
    def __init__(self, sgd_momentum: float) -> None:
        super().__init__()
        self.net = make_net()
        self.sgd_momentum = sgd_momentum

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=self.sgd_momentum)

    def train_dataloader(self) -> DataLoader:
        """This rank's fixed slice of every global batch, one slice per step."""
        n = GLOBAL_BATCH // self.trainer.world_size
        mine = slice(self.global_rank * n, (self.global_rank + 1) * n)
        return DataLoader([(x[mine], y[mine]) for x, y in global_batches()], batch_size=None)


class RecordingSync(AutoSyncBatchNorm):
    """Writes, on every rank, the layer classes after apply and after revert (workers are other processes)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def _record(self, stage: str, model: nn.Module) -> None:
        path = Path(self.folder) / f"{stage}-{torch.distributed.get_rank()}.json"
        path.write_text(json.dumps(layer_classes(model)))

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        self._record("applied", model)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        model = super().revert(model)
        self._record("reverted", model)
        return model


def layer_classes(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if "BatchNorm" in type(m).__name__}


def reference_state(sgd_momentum: float) -> dict[str, torch.Tensor]:
    """One process, plain BatchNorm, the whole global batches, the mean loss."""
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=sgd_momentum)
    for x, y in global_batches():
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.state_dict()


def assert_matches_reference(state: dict[str, torch.Tensor], sgd_momentum: float) -> None:
    expected = reference_state(sgd_momentum)
    assert state.keys() == expected.keys()
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == want.dtype, key
        if key.endswith("num_batches_tracked"):
            assert got.item() == want.item() == STEPS, key
            continue
        scale = max(want.abs().max().item(), 1.0)
        assert (got - want).abs().max().item() <= 1e-5 * scale, f"{key}: {got} != {want}"


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """Lightning's launchers set MASTER_PORT and the like in this process: put them back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.timeout(100)
def test_ddp_spawn_equals_one_process_with_the_global_batch(tmp_path: Path, restored_environ: None) -> None:
    model = LitNet(sgd_momentum=0.0)
    trainer = pl.Trainer(**TRAINER, strategy="ddp_spawn", plugins=[RecordingSync(str(tmp_path))])
    trainer.fit(model)
    # ddp_spawn loads rank 0's final state (parameters and running statistics) into this process's model.
    assert_matches_reference(model.net.state_dict(), sgd_momentum=0.0)
    for rank in (0, 1):
        applied = json.loads((tmp_path / f"applied-{rank}.json").read_text())
        reverted = json.loads((tmp_path / f"reverted-{rank}.json").read_text())
        assert applied == {"net.1": "SynchronizedBatchNorm2d", "net.4": "SynchronizedBatchNormAct2d",
                           "net.8": "SynchronizedBatchNorm1d"}
        assert reverted == {"net.1": "BatchNorm2d", "net.4": "BatchNormAct2d", "net.8": "BatchNorm1d"}


def run_ddp(out: str) -> None:
    """The script mode: ``strategy="ddp"``; Lightning starts rank 1 by running this file again."""
    model = LitNet(sgd_momentum=0.9)
    trainer = pl.Trainer(**TRAINER, strategy="ddp", plugins=[AutoSyncBatchNorm()])
    trainer.fit(model)
    if trainer.global_rank == 0:  # this process: its model after fit, reverted by the plugin
        torch.save({"state": model.net.state_dict(), "classes": layer_classes(model),
                    "bn_act_class": type(model.net[4]).__module__ + "." + type(model.net[4]).__qualname__}, out)


@pytest.mark.timeout(110)
def test_ddp_equals_one_process_with_the_global_batch_and_reverts(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(name, None)
    # Its own session: on a timeout, rank 1 (started by Lightning) is killed with it.
    script = subprocess.Popen([sys.executable, __file__, "ddp", str(out)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = script.communicate(timeout=100)
    finally:
        if script.poll() is None:  # timed out: end the script and the rank it started
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    assert script.returncode == 0, output[-4000:]
    saved: dict[str, Any] = torch.load(out)
    assert_matches_reference(saved["state"], sgd_momentum=0.9)
    assert saved["classes"] == {"net.1": "BatchNorm2d", "net.4": "BatchNormAct2d", "net.8": "BatchNorm1d"}
    assert saved["bn_act_class"] == "__main__.BatchNormAct2d"  # the user's own class, its forward back


def test_apply_and_revert_keep_parameters_and_use_the_given_group() -> None:
    model = LitNet(sgd_momentum=0.0)
    weight, net_1 = model.net[4].weight, model.net[1]
    sentinel = object()  # a stand-in group: apply only records it, no forward runs
    plugin = AutoSyncBatchNorm(process_group=lambda: sentinel)
    applied = plugin.apply(model)
    assert applied is model and applied.net[1] is not net_1
    assert applied.net[4].weight is weight and applied.net[4].process_group is sentinel
    assert isinstance(applied.net[4], BatchNormAct2d)  # the synchronized twin keeps the user's class
    reverted = plugin.revert(applied)
    assert reverted is model and type(reverted.net[4]) is BatchNormAct2d and reverted.net[4].weight is weight
    assert type(reverted.net[1]) is nn.BatchNorm2d and type(reverted.net[8]) is nn.BatchNorm1d


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_both_lightning_packages_accept_the_plugin(package: str) -> None:
    lightning_package = pytest.importorskip(package)
    plugin = AutoSyncBatchNorm()
    assert isinstance(plugin, lightning_package.plugins.LayerSync)
    trainer = lightning_package.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", plugins=[plugin],
                                        logger=False, enable_checkpointing=False)
    assert trainer.strategy._layer_sync is plugin


@pytest.mark.timeout(60)
def test_import_autosyncbn_does_not_import_lightning() -> None:
    code = ("import sys, autosyncbn, autosyncbn.testing, autosyncbn.processes\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]\n"
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr[-2000:]


def test_without_lightning_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch.plugins.layer_sync",
                 "pytorch_lightning", "pytorch_lightning.plugins.layer_sync"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now fails as if not installed
    monkeypatch.delitem(sys.modules, "autosyncbn.lightning")
    with pytest.raises(ImportError, match=r"pip install autosyncbn\[lightning\]"):
        importlib.import_module("autosyncbn.lightning")


if __name__ == "__main__":
    assert sys.argv[1] == "ddp", sys.argv
    run_ddp(sys.argv[2])
