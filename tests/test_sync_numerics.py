"""Synchronized training matches one device with the whole batch and plain BatchNorm."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel

from helpers import ConvBlock, assert_close_to_scale, assert_models_match, input_of_rank, loss_of, train_side_by_side

pytestmark = pytest.mark.usefixtures("installed")


@pytest.mark.parametrize("rank", [2, 3, 4, 5], ids=["N,C", "N,C,L", "N,C,H,W", "N,C,D,H,W"])
@pytest.mark.parametrize("num_replicas,batch", [(1, 6), (2, 6), (3, 7), (4, 10), (8, 9), (8, 16)])
def test_training_steps_match_whole_batch(rank, num_replicas, batch):
    model = ConvBlock(rank)
    inputs = [input_of_rank(rank, batch).requires_grad_() for _ in range(3)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(model, inputs, num_replicas):
        assert_close_to_scale(out, ref_out, what='output')
        assert_close_to_scale(x.grad, x_ref.grad, what='input grad')
        assert_models_match(trained, reference)


@pytest.mark.parametrize(
    "options",
    [
        dict(affine=False),
        dict(track_running_stats=False),
        dict(momentum=None),
        dict(momentum=0.5, eps=1e-2),
        dict(affine=False, track_running_stats=False, momentum=None),
    ],
    ids=str,
)
def test_every_batchnorm_option(options):
    model = ConvBlock(4, **options)
    inputs = [input_of_rank(4, 7).requires_grad_() for _ in range(4)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(model, inputs, 3):
        assert_close_to_scale(out, ref_out, what='output')
        assert_close_to_scale(x.grad, x_ref.grad, what='input grad')
        assert_models_match(trained, reference)


def test_parameters_match_after_sgd_loop():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
    )
    inputs = [torch.randn(8, 3, 6, 6) for _ in range(6)]
    for *_, trained, reference in train_side_by_side(model, inputs, 4):
        pass
    assert_models_match(trained, reference, rel=1e-4)
    assert trained[1].num_batches_tracked.item() == 6


def test_channels_last_input():
    model = ConvBlock(4)
    model.mix = nn.Identity()
    model.bn1 = nn.BatchNorm2d(3)
    model.bn2 = nn.BatchNorm2d(3)
    inputs = [input_of_rank(4, 8).contiguous(memory_format=torch.channels_last).requires_grad_() for _ in range(2)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(model, inputs, 4):
        assert_close_to_scale(out, ref_out, what='output')
        assert_close_to_scale(x.grad, x_ref.grad, what='input grad')
        assert_models_match(trained, reference)


def test_float64():
    model = ConvBlock(3).double()
    inputs = [input_of_rank(3, 9).double().requires_grad_() for _ in range(3)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(model, inputs, 4):
        assert out.dtype == torch.float64
        assert_close_to_scale(out, ref_out, 1e-10, "output")
        assert_close_to_scale(x.grad, x_ref.grad, 1e-10, "input grad")
        assert_models_match(trained, reference, rel=1e-10)


def test_bfloat16_autocast_accumulates_in_float32():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6))
    reference = copy.deepcopy(model)
    parallel = EmulatedDataParallel(model, 4)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = parallel(x)
        ref_out = reference(x)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    # Statistics in float32 on both sides; outputs agree to bfloat16 precision.
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, atol=1e-3, rtol=1e-3)
    target = torch.randn(8, 6, 5, 5)
    loss_of(out.float(), target).backward()
    loss_of(ref_out.float(), target).backward()
    torch.testing.assert_close(model[1].weight.grad, reference[1].weight.grad, atol=0.5, rtol=2e-2)
    assert model[1].running_mean.dtype == torch.float32


class CallsTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.bn(self.lin(self.bn(x)))


def test_layer_called_twice_per_forward():
    inputs = [torch.randn(10, 4).requires_grad_() for _ in range(3)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(CallsTwice(), inputs, 4):
        assert_close_to_scale(out, ref_out, what='output')
        assert_close_to_scale(x.grad, x_ref.grad, what='input grad')
        assert_models_match(trained, reference)
    assert trained.bn.num_batches_tracked.item() == 6


def test_no_grad_training_mode_still_synchronizes():
    # Re-estimating BatchNorm statistics under no_grad (precise BN) must use the
    # whole batch, as torch.nn.SyncBatchNorm does.
    model = ConvBlock(4)
    reference = copy.deepcopy(model)
    parallel = EmulatedDataParallel(model, 4)
    x = input_of_rank(4, 10)
    with torch.no_grad():
        out = parallel(x)
        ref_out = reference(x)
    assert_close_to_scale(out, ref_out, what='output')
    assert_models_match(model, reference)


def test_eval_mode_is_pytorch_bit_for_bit():
    model = ConvBlock(4)
    for x in [input_of_rank(4, 8) for _ in range(2)]:
        model(x)  # give the running statistics some history
    model.eval()
    parallel = EmulatedDataParallel(model, 4)
    x = input_of_rank(4, 8)
    expected = torch.cat([model(part) for part in x.chunk(4)])
    assert torch.equal(parallel(x), expected)


def test_slice_with_one_value_per_channel_is_fine():
    # 5 samples on 4 replicas: chunk sizes 2, 2, 1 (three replicas) -> the last slice
    # holds one value per channel; the whole batch holds five.
    inputs = [torch.randn(5, 4).requires_grad_() for _ in range(2)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(CallsTwice(), inputs, 4):
        assert_close_to_scale(out, ref_out, what='output')
        assert_models_match(trained, reference)


def test_numerically_hard_input_stays_within_twice_pytorch_error():
    torch.manual_seed(7)
    x64 = torch.randn(16, 4, 8, 8, dtype=torch.float64) + 1e4
    x = x64.float()
    exact = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    pytorch_error = (nn.BatchNorm2d(4, affine=False)(x).double() - exact).abs().max().item()
    layer = nn.BatchNorm2d(4, affine=False)
    ours = EmulatedDataParallel(layer, 4)(x)
    our_error = (ours.double() - exact).abs().max().item()
    assert our_error <= 2 * pytorch_error + 1e-7, (our_error, pytorch_error)


def test_lazy_batchnorm_once_materialized():
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    model(torch.randn(4, 3))  # materializes: the layer becomes a BatchNorm1d
    inputs = [torch.randn(9, 3).requires_grad_() for _ in range(2)]
    for out, ref_out, x, x_ref, trained, reference in train_side_by_side(model, inputs, 3):
        assert_close_to_scale(out, ref_out, what="output")
        assert_close_to_scale(x.grad, x_ref.grad, what="input grad")
        assert_models_match(trained, reference)


class _DropsItsOutputInOneReplica(nn.Module):
    """Replica 0 (first row positive) keeps the BatchNorm output; replica 1 discards it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        y = self.bn(x)
        return y if x[0, 0] > 0 else x * 2


def test_replica_that_discards_its_output_still_gets_the_statistics_share():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[0, 0], x[3, 0] = 1.0, -1.0
    model = _DropsItsOutputInOneReplica().double()
    reference_x = x.clone().requires_grad_()
    y = copy.deepcopy(model).bn(reference_x)
    torch.cat([y[:3], reference_x[3:] * 2]).square().sum().backward()

    ours_x = x.clone().requires_grad_()
    with autosyncbn.patched():
        EmulatedDataParallel(model, 2)(ours_x).square().sum().backward()
    torch.testing.assert_close(ours_x.grad, reference_x.grad, rtol=1e-12, atol=1e-12)


def test_concurrent_backward_passes_over_one_graph_stay_apart():
    import threading

    torch.manual_seed(0)
    x = torch.randn(64, 8, 16, dtype=torch.float64, requires_grad=True)
    with autosyncbn.patched():
        y = EmulatedDataParallel(nn.BatchNorm1d(8).double(), 2)(x)
    loss = (y * torch.randn_like(y)).sum()
    expected, = torch.autograd.grad(loss, [x], retain_graph=True)
    reference, = torch.autograd.grad((nn.functional.batch_norm(x, None, None, training=True)
                                      * torch.autograd.grad(loss, [y], retain_graph=True)[0]).sum(), [x])
    torch.testing.assert_close(expected, reference, rtol=1e-10, atol=1e-12)
    errors = []

    def backward_many_times() -> None:
        for _ in range(20):
            got, = torch.autograd.grad(loss, [x], retain_graph=True)
            errors.append((got - expected).abs().max().item())

    threads = [threading.Thread(target=backward_many_times) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(errors) == 40 and max(errors) == 0.0
