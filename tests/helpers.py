"""The oracle: the same model on one device with the whole batch and plain BatchNorm."""
from __future__ import annotations

import copy
import threading
from typing import Callable, Sequence

import torch
from torch import nn

from autosyncbn.testing import EmulatedDataParallel

BATCHNORM_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class ConvBlock(nn.Module):
    """Linear mixing of channels, BatchNorm, a nonlinearity, and BatchNorm again."""

    def __init__(self, rank: int, channels: int = 3, hidden: int = 5, **bn_options) -> None:
        super().__init__()
        bn = BATCHNORM_BY_RANK[rank]
        self.rank = rank
        self.mix = nn.Linear(channels, hidden)
        self.bn1 = bn(hidden, **bn_options)
        self.bn2 = bn(hidden, **bn_options)

    def _channels_last_linear(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        # Apply a Linear over the channel dimension for any input rank.
        return linear(x.movedim(1, -1)).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self._channels_last_linear(x, self.mix))
        return self.bn2(torch.tanh(h) * 1.5 + h)


def loss_of(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Not invariant under BatchNorm (sum(y**2) after BatchNorm would be constant).
    return (output * target).sum() + (output - target).square().mean()


def train_side_by_side(
    model: nn.Module,
    inputs: list[torch.Tensor],
    num_replicas: int,
    wrap: Callable[[nn.Module, int], nn.Module] = EmulatedDataParallel,
    lr: float = 0.05,
):
    """Train ``model`` under ``wrap`` and a deep copy on the whole batch; yield per step."""
    reference = copy.deepcopy(model)
    parallel = wrap(model, num_replicas)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
    for x in inputs:
        x_ref = x.detach().clone().requires_grad_(x.requires_grad)
        x_par = x.detach().clone().requires_grad_(x.requires_grad)
        out = parallel(x_par)
        ref_out = reference(x_ref)
        target = torch.randn_like(ref_out, dtype=torch.float32).to(ref_out.dtype)
        loss_of(out, target).backward()
        loss_of(ref_out, target).backward()
        yield out, ref_out, x_par, x_ref, model, reference
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-5, what: str = "",
                          scale: float = 1.0) -> None:
    """Agreement within ``rel`` of the scale of the values (DESIGN: about 1e-5 in float32).

    Elementwise relative tolerance would judge round-off on values that are
    zero in exact arithmetic (a bias before BatchNorm gets no gradient).
    ``scale`` is a floor for the scale (at least 1).
    """
    assert actual is not None and expected is not None, f"{what}: one side is None"
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel():
        scale = max(expected.detach().abs().max().item(), scale)
    torch.testing.assert_close(
        actual, expected, atol=rel * scale, rtol=0, msg=lambda m: f"{what} (scale {scale:.3g}): {m}"
    )


def assert_models_match(model: nn.Module, reference: nn.Module, rel: float = 2e-5) -> None:
    # Gradients are judged against the model's largest gradient: a bias right before
    # BatchNorm has zero gradient in exact arithmetic, so its own scale is round-off.
    grads = [q.grad.abs().max().item() for q in reference.parameters() if q.grad is not None and q.grad.numel()]
    grad_scale = max(grads, default=1.0)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert_close_to_scale(p, q, rel, f"parameter {name}")
        if q.grad is not None or p.grad is not None:
            assert_close_to_scale(p.grad, q.grad, rel, f"grad of {name}", scale=grad_scale)
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        assert_close_to_scale(b, c, rel, f"buffer {name}")


def input_of_rank(rank: int, batch: int, channels: int = 3, generator=None) -> torch.Tensor:
    spatial = {2: (), 3: (7,), 4: (4, 5), 5: (3, 4, 2)}[rank]
    return torch.randn(batch, channels, *spatial, generator=generator) * 2.0 + 0.5


def run_in_threads(replicas: Sequence[nn.Module], inputs: Sequence[tuple], kwargs: Sequence[dict] = ()) -> list:
    """Run each replica in a thread of its own, as a user's CPU harness would; re-raise the first error."""
    outputs, errors = [None] * len(replicas), [None] * len(replicas)
    kwargs = list(kwargs) or [{}] * len(replicas)

    def run(index: int) -> None:
        try:
            outputs[index] = replicas[index](*inputs[index], **kwargs[index])
        except Exception as error:
            errors[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    first = next((error for error in errors if error is not None), None)
    errors.clear()  # the error's traceback reaches run(), whose closure holds this list: no cycle
    if first is not None:
        try:
            raise first
        finally:
            first = None
    return outputs


class OwnThreads(EmulatedDataParallel):
    """A DataParallel whose replicas are made by the real replicate and run in threads of its own."""

    def parallel_apply(self, replicas, inputs, kwargs):
        return run_in_threads(replicas, inputs, kwargs)
