"""Threads: models trained side by side, forwards in a row (toggling: test_hardening.py)."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import autosyncbn
from autosyncbn.testing import EmulatedDataParallel

from helpers import ConvBlock, assert_close_to_scale, assert_models_match, input_of_rank, loss_of

pytestmark = pytest.mark.timeout(120)


def _train(model, reference, inputs, replicas, errors):
    try:
        parallel = EmulatedDataParallel(model, replicas)
        generator = torch.Generator().manual_seed(replicas)
        for x in inputs:
            out, ref_out = parallel(x), reference(x)
            assert_close_to_scale(out, ref_out, what="output")
            target = torch.randn(out.shape, generator=generator)
            loss_of(out, target).backward()
            loss_of(ref_out, target).backward()
            assert_models_match(model, reference)
            model.zero_grad()
            reference.zero_grad()
    except BaseException as error:  # surfaced in the main thread
        errors.append(error)


def test_two_models_trained_in_two_threads_at_once(installed):
    errors: list = []
    jobs = []
    for seed, replicas in [(1, 3), (2, 4)]:
        torch.manual_seed(seed)
        model = ConvBlock(4)
        jobs.append(threading.Thread(target=_train, args=(
            model, copy.deepcopy(model), [input_of_rank(4, 9) for _ in range(15)], replicas, errors)))
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert not errors, errors[0]


def test_many_forwards_in_a_row_share_no_state(installed):
    model = ConvBlock(2)
    reference = copy.deepcopy(model)
    parallel = EmulatedDataParallel(model, 4)
    for step in range(40):
        x = input_of_rank(2, 5 + step % 7)  # the number of replicas used varies too
        assert_close_to_scale(parallel(x), reference(x), what=f"forward {step}")
    assert_models_match(model, reference)
