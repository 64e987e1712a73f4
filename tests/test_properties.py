"""Property-based: random BatchNorm kinds, shapes, options and replica counts vs one device.

The default run is fast; AUTOSYNCBN_HYPOTHESIS=thorough runs many more cases.
"""
from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel

from helpers import BATCHNORM_BY_RANK, assert_close_to_scale, assert_models_match

settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("AUTOSYNCBN_HYPOTHESIS", "default"))

SPATIAL = {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}


@st.composite
def cases(draw):
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    batch = draw(st.integers(2, 11))
    return dict(
        rank=rank,
        channels=draw(st.integers(1, 6)),
        batch=batch,
        replicas=draw(st.integers(1, 9)),  # more replicas than samples: fewer are used
        affine=draw(st.booleans()),
        momentum=draw(st.sampled_from([None, 0.1, 0.7])),
        track=draw(st.booleans()),
        training=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        offset=draw(st.sampled_from([0.0, 3.0, 100.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def assert_within_pytorch_error(ours, pytorch, exact, rel, what):
    """Our error against a float64 oracle is at most twice PyTorch's own, plus ``rel`` of the scale.

    Comparing with PyTorch's float32 result alone would judge two round-offs
    against each other (with two samples per channel the true input gradient
    is nearly zero, and both sides are noise at that scale).
    """
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    ours_error = (ours.double() - exact).abs().max().item() if exact.numel() else 0.0
    pytorch_error = (pytorch.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert ours_error <= 2 * pytorch_error + rel * scale, (what, ours_error, pytorch_error, scale)


@given(case=cases())
def test_random_cases_match_one_device(case):
    torch.manual_seed(case["seed"])
    layer = BATCHNORM_BY_RANK[case["rank"]](
        case["channels"], affine=case["affine"], momentum=case["momentum"], track_running_stats=case["track"]
    ).to(case["dtype"])
    if case["affine"]:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
    layer.train(case["training"])
    reference = copy.deepcopy(layer)
    exact = copy.deepcopy(layer).double()
    shape = (case["batch"], case["channels"], *SPATIAL[case["rank"]])
    x = (torch.randn(shape, dtype=case["dtype"]) * 2 + case["offset"]).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    x_exact = x.detach().double().requires_grad_()
    rel = 1e-10 if case["dtype"] == torch.float64 else 5e-5
    with autosyncbn.patched():
        parallel = EmulatedDataParallel(layer, case["replicas"])
        for step in range(2):
            out, ref_out, exact_out = parallel(x), reference(x_ref), exact(x_exact)
            weights = torch.randn(shape, dtype=case["dtype"], generator=torch.Generator().manual_seed(step))
            (out * weights).sum().backward()
            (ref_out * weights).sum().backward()
            (exact_out * weights.double()).sum().backward()
            assert_within_pytorch_error(out, ref_out, exact_out, rel, "output")
            assert_within_pytorch_error(x.grad, x_ref.grad, x_exact.grad, rel, "input grad")
            for (name, ours), pytorch, oracle in zip(layer.named_parameters(), reference.parameters(),
                                                     exact.parameters()):
                assert_within_pytorch_error(ours.grad, pytorch.grad, oracle.grad, rel, f"grad of {name}")
            for (name, ours), pytorch, oracle in zip(layer.named_buffers(), reference.buffers(), exact.buffers()):
                assert_within_pytorch_error(ours, pytorch, oracle, rel, name)
