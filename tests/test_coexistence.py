"""PyTorch features keep working while installed, and synchronized layers serialize."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel

from helpers import ConvBlock, assert_close_to_scale, assert_models_match, input_of_rank, loss_of


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


@pytest.mark.timeout(300)
def test_torch_compile_has_no_extra_graph_breaks_and_same_result():
    torch.manual_seed(0)
    model = cnn()
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    plain = torch._dynamo.explain(copy.deepcopy(model))(x)
    torch._dynamo.reset()
    with autosyncbn.patched():
        patched = torch._dynamo.explain(copy.deepcopy(model))(x)
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
        out = compiled(x)
    torch._dynamo.reset()
    assert patched.graph_break_count == plain.graph_break_count == 0
    assert patched.graph_count == plain.graph_count
    torch.testing.assert_close(out, copy.deepcopy(model)(x))


def test_jit_trace_while_installed(installed):
    model = cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("replicas", [2, 4])
def test_double_backward_gradient_penalty_matches_one_device(installed, replicas):
    """WGAN-GP / R1: grad(create_graph=True) through synchronized layers, then backward."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8),
                           nn.BatchNorm1d(8, momentum=None), nn.Softplus(), nn.Linear(8, 1)).double()
    reference = copy.deepcopy(critic)
    x = torch.randn(10, 3, dtype=torch.float64)

    def penalty(model):
        inputs = x.clone().requires_grad_()
        scores = model(inputs)
        grads, = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
        loss = ((grads.norm(dim=1) - 1) ** 2).mean() + scores.mean()
        loss.backward()
        return loss

    torch.testing.assert_close(penalty(EmulatedDataParallel(critic, replicas)), penalty(reference))
    assert_models_match(critic, reference, rel=1e-10)


def test_anomaly_detection(installed):
    model = ConvBlock(4)
    reference = copy.deepcopy(model)
    x = input_of_rank(4, 8)
    target = torch.randn(8, 5, 4, 5)
    with torch.autograd.set_detect_anomaly(True):
        out = EmulatedDataParallel(model, 4)(x)
        loss_of(out, target).backward()
    ref_out = reference(x)
    loss_of(ref_out, target).backward()
    assert_close_to_scale(out, ref_out)
    assert_models_match(model, reference)


def test_forward_hooks_on_batchnorm_still_fire(installed):
    model = cnn()
    seen = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    model[1].register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    EmulatedDataParallel(model, 2)(torch.randn(4, 3, 8, 8))
    assert seen.count("pre") == 2 and seen.count((2, 8, 8, 8)) == 2


def _roundtrips(model):
    yield copy.deepcopy(model)
    yield pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit layers", "plain while installed"])
def test_serialization_roundtrips(explicit):
    torch.manual_seed(0)
    model = autosyncbn.convert_model(ConvBlock(4)) if explicit else ConvBlock(4)
    with autosyncbn.patched():
        model(input_of_rank(4, 6))
        for copy_ in _roundtrips(model):
            assert type(copy_.bn1) is type(model.bn1)
            for (key, value), other in zip(model.state_dict().items(), copy_.state_dict().values()):
                assert torch.equal(value, other), key
            # The copy still synchronizes and matches one device.
            reference = copy.deepcopy(copy_)
            x = input_of_rank(4, 8)
            assert_close_to_scale(EmulatedDataParallel(copy_, 4)(x), reference(x))
    fresh = ConvBlock(4)
    fresh.load_state_dict(model.state_dict())
