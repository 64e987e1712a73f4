"""A complete test file for your own CI: multi-GPU BatchNorm code checked on CPU replicas.

Run it with ``python -m pytest examples/ci``. The fixtures come from
autosyncbn's pytest plugin, active wherever autosyncbn is installed.
"""
import copy

import torch
from torch import nn

import autosyncbn


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4),
    )


def test_data_parallel_training_step_matches_one_device(autosyncbn_installed, emulated_data_parallel):
    torch.manual_seed(0)
    model = make_model()
    reference = copy.deepcopy(model)
    parallel = emulated_data_parallel(model, num_replicas=4)
    x = torch.randn(10, 3, 8, 8)  # uneven slices: 3, 3, 3, 1
    target = torch.randn(10, 4, 8, 8)
    out, expected = parallel(x), reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    (out * target).sum().backward()
    (expected * target).sum().backward()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_explicit_api_without_install(emulated_data_parallel):
    torch.manual_seed(0)
    model = autosyncbn.convert_model(make_model())
    reference = autosyncbn.revert_model(copy.deepcopy(model))
    parallel = emulated_data_parallel(model, num_replicas=2, explicit=True)
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(parallel(x), reference(x), atol=1e-5, rtol=1e-4)
