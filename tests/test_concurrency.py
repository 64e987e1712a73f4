"""Threads: models trained side by side, patches toggled while training, forwards in a row."""
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


def test_patches_toggled_while_another_thread_trains():
    """Each forward is wholly synchronized or wholly not: never half, never an error."""
    stop = threading.Event()
    errors: list = []
    outcomes = {"synchronized": 0, "per-slice": 0}

    def train():
        try:
            layer = nn.BatchNorm1d(3)
            parallel = EmulatedDataParallel(layer, 4)
            x = torch.randn(8, 3) + torch.arange(8.0).unsqueeze(1)
            whole = nn.functional.batch_norm(x, None, None, training=True)
            per_slice = torch.cat([nn.functional.batch_norm(p, None, None, training=True) for p in x.chunk(4)])
            while not stop.is_set():
                out = parallel(x)
                out.sum().backward()
                if torch.allclose(out, whole, atol=1e-5):
                    outcomes["synchronized"] += 1
                elif torch.allclose(out, per_slice, atol=1e-5):
                    outcomes["per-slice"] += 1
                else:
                    raise AssertionError("a forward mixed synchronized and per-slice statistics")
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=train)
    worker.start()
    try:
        pause = threading.Event()
        for i in range(150):
            if i % 3 == 0:
                autosyncbn.install()
                autosyncbn.uninstall()
            elif i % 3 == 1:
                with autosyncbn.patched():
                    with autosyncbn.patched(timeout=30):
                        pause.wait(0.002)
            else:
                autosyncbn.install()
                pause.wait(0.002)
                autosyncbn.uninstall()
            pause.wait(0.002)  # some forwards run uninstalled, too
    finally:
        stop.set()
        worker.join(30)
    assert not errors, errors[0]
    # Both kinds of forward happened: the toggling really raced the training.
    assert outcomes["synchronized"] > 0 and outcomes["per-slice"] > 0, outcomes


def test_many_forwards_in_a_row_share_no_state(installed):
    model = ConvBlock(2)
    reference = copy.deepcopy(model)
    parallel = EmulatedDataParallel(model, 4)
    for step in range(40):
        x = input_of_rank(2, 5 + step % 7)  # the number of replicas used varies too
        assert_close_to_scale(parallel(x), reference(x), what=f"forward {step}")
    assert_models_match(model, reference)
