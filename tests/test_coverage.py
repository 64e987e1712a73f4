"""Every batch-statistics computation in a replica synchronizes, whatever makes it, or the user is told."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel, EmulatedDataParallelWithCallback, cpu_replicate

from helpers import OwnThreads, ConvBlock, assert_close_to_scale, assert_models_match, input_of_rank, train_side_by_side

pytestmark = pytest.mark.timeout(60)


class BatchNormAct2d(nn.BatchNorm2d):
    """Shaped like timm's BatchNormAct2d: a BatchNorm2d whose own forward calls F.batch_norm."""

    def __init__(self, channels: int, **options) -> None:
        super().__init__(channels, **options)
        self.act = nn.SiLU()

    def forward(self, x):
        if self.momentum is None:
            factor = 0.0
        else:
            factor = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or self.running_mean is None, factor, self.eps)
        return self.act(x)


class ConditionalBatchNorm(nn.Module):
    """A GAN generator's class-conditional BatchNorm: F.batch_norm on its own buffers, then gains."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.register_buffer("stored_mean", torch.zeros(channels))
        self.register_buffer("stored_var", torch.ones(channels))
        self.gain = nn.Embedding(classes, channels)
        self.shift = nn.Embedding(classes, channels)
        nn.init.normal_(self.gain.weight, 1.0, 0.2)

    def forward(self, x, y):
        out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, 1e-4)
        return out * self.gain(y)[:, :, None, None] + self.shift(y)[:, :, None, None]


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.cbn = ConditionalBatchNorm(6, classes=4)
        self.bnact = BatchNormAct2d(6, momentum=None)

    def forward(self, x, y):
        return self.bnact(self.cbn(self.conv(x), y))


def test_subclass_with_own_forward_and_functional_calls_match_one_device(installed):
    torch.manual_seed(0)
    model = Generator()
    reference = copy.deepcopy(model)
    parallel = EmulatedDataParallel(model, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(3):
        x = torch.randn(10, 3, 5, 5) * 2 + 1
        y = torch.randint(0, 4, (10,))
        target = torch.randn(10, 6, 5, 5)
        out, ref_out = parallel(x, y), reference(x, y)
        assert_close_to_scale(out, ref_out, what=f"output, step {step}")
        (out * target).sum().backward()
        (ref_out * target).sum().backward()
        assert_models_match(model, reference)
        for opt in (optimizer, ref_optimizer):
            opt.step()
            opt.zero_grad()
    assert model.bnact.num_batches_tracked.item() == 3


def test_sync_batchnorm_converted_model_under_data_parallel(installed):
    """nn.SyncBatchNorm without a process group is PyTorch's known silent-local case."""
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    inputs = [torch.randn(9, 3, 6, 6).requires_grad_() for _ in range(2)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(model, inputs, 4):
        assert_close_to_scale(out, ref_out, what="output")
        assert_close_to_scale(x.grad, x_ref.grad, what="input grad")
        assert_models_match(trained, reference)


class GhostBatchNorm(nn.BatchNorm1d):
    """Ghost BatchNorm: statistics per virtual batch of two chunks, one BatchNorm call per chunk."""

    def forward(self, x):
        return torch.cat([super(GhostBatchNorm, self).forward(part) for part in x.chunk(2)])


def test_ghost_batchnorm_follows_the_documented_rule(installed):
    """Call k of every replica is one computation: virtual batch k is every replica's k-th chunk."""
    torch.manual_seed(0)
    layer = GhostBatchNorm(3, affine=False)
    x = torch.randn(16, 3) * 3 + torch.arange(16.0).unsqueeze(1)
    out = EmulatedDataParallel(layer, 4)(x)
    slices = [part.chunk(2) for part in x.chunk(4)]
    expected_parts = []
    for k in range(2):
        whole = torch.cat([chunks[k] for chunks in slices])
        mean, var = whole.mean(0), whole.var(0, unbiased=False)
        expected_parts.append([(chunks[k] - mean) / torch.sqrt(var + layer.eps) for chunks in slices])
    expected = torch.cat([torch.cat([expected_parts[k][r] for k in range(2)]) for r in range(4)])
    assert_close_to_scale(out, expected, what="ghost batches")
    assert layer.num_batches_tracked.item() == 2


@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 5), (6, 4, 2, 3, 3)], ids=["2-D", "3-D", "5-D"])
def test_convert_and_revert_sync_batchnorm_keep_every_input_rank(shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.SyncBatchNorm(4, momentum=0.3))
    converted = autosyncbn.convert_model(copy.deepcopy(model))
    assert type(converted[0]) is autosyncbn.SynchronizedBatchNorm
    reference = autosyncbn.revert_model(copy.deepcopy(converted))
    x = torch.randn(*shape) * 2 + 1
    out = EmulatedDataParallelWithCallback(converted, 3)(x)
    assert_close_to_scale(out, reference(x), what="converted under the explicit API")
    assert_close_to_scale(converted[0].running_var, reference[0].running_var, what="running_var")
    assert reference[0](x).shape == x.shape  # the reverted layer takes the same inputs
    with pytest.raises(ValueError, match="at least 2D"):
        converted[0](torch.randn(4))


def test_momentum_none_in_a_subclass_with_its_own_forward(installed):
    torch.manual_seed(0)
    layer = BatchNormAct2d(3, momentum=None)
    reference = copy.deepcopy(layer)
    parallel = EmulatedDataParallel(layer, 3)
    for _ in range(4):
        x = torch.randn(7, 3, 2, 2) * 4 + 2
        assert_close_to_scale(parallel(x), reference(x))
    assert_models_match(layer, reference)


def test_a_data_parallel_that_runs_its_replicas_itself_synchronizes(installed):
    torch.manual_seed(0)
    model = ConvBlock(4)
    reference = copy.deepcopy(model)
    for step, (out, ref_out, x, x_ref, model, reference) in enumerate(
            train_side_by_side(model, [input_of_rank(4, 7).requires_grad_() for _ in range(3)], 3, OwnThreads)):
        assert_close_to_scale(out, ref_out, what=f"output, step {step}")
        assert_close_to_scale(x.grad, x_ref.grad, what=f"input grad, step {step}")
        assert_models_match(model, reference)


def test_replicas_made_before_install_warn_once_per_layer():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    replicas = cpu_replicate(model, 2)  # not registered: install() came later
    with autosyncbn.patched():
        with pytest.warns(autosyncbn.UnsynchronizedBatchNormWarning, match="did not register") as caught:
            OwnThreads(model, 2).parallel_apply(replicas, [(p,) for p in torch.randn(8, 3).chunk(2)], [{}, {}])
        layers = {str(w.message).split("'")[1] for w in caught
                  if issubclass(w.category, autosyncbn.UnsynchronizedBatchNormWarning)}
        assert layers == {"1", "2"}
        with warnings.catch_warnings():
            warnings.simplefilter("error", autosyncbn.UnsynchronizedBatchNormWarning)
            OwnThreads(model, 2).parallel_apply(replicas, [(p,) for p in torch.randn(8, 3).chunk(2)],
                                                     [{}, {}])  # once per layer, not once per forward


class CallsTheKernelDirectly(nn.BatchNorm1d):
    """Reaches PyTorch's kernel without F.batch_norm: autosyncbn cannot synchronize it."""

    def forward(self, x):
        self.num_batches_tracked.add_(1)
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                True, 0.1, self.eps, False)


def test_a_layer_that_bypasses_f_batch_norm_warns_and_excluding_it_silences(installed):
    model = nn.Sequential(nn.BatchNorm1d(3), CallsTheKernelDirectly(3))
    with pytest.warns(autosyncbn.UnsynchronizedBatchNormWarning, match="'1'.*without passing through"):
        EmulatedDataParallel(model, 2)(torch.randn(8, 3))
    quiet = nn.Sequential(nn.BatchNorm1d(3), CallsTheKernelDirectly(3))
    autosyncbn.exclude(quiet[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", autosyncbn.UnsynchronizedBatchNormWarning)
        EmulatedDataParallel(quiet, 2)(torch.randn(8, 3))


def test_sync_report_says_what_synchronized_and_why(installed):
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    autosyncbn.exclude(model[1])
    model[2].eval()
    with autosyncbn.sync_report() as report:
        EmulatedDataParallel(model, 2)(torch.randn(8, 3))
        model(torch.randn(8, 3))  # outside any replica
    assert report.synchronized == ["0"]
    assert report.per_slice["1"] == ["excluded", "not in a DataParallel replica"]
    assert report.per_slice["2"] == ["eval mode: running statistics"]
    assert report.per_slice["0"] == ["not in a DataParallel replica"]
    assert "synchronized: 2 replicas" in str(report)


def test_explicit_api_leaves_plain_layers_to_pytorch_and_says_so():
    model = nn.Sequential(autosyncbn.SynchronizedBatchNorm1d(3), nn.BatchNorm1d(3))
    with autosyncbn.sync_report() as report, pytest.warns(autosyncbn.UnsynchronizedBatchNormWarning,
                                                          match=r"'1' \(BatchNorm1d\).*install\(\)"):
        EmulatedDataParallelWithCallback(model, 2)(torch.randn(8, 3))
    assert report.synchronized == ["0"]
