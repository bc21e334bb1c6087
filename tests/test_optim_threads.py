"""Concurrent steps (issue 14 #4): one optimizer's steps are serialized, so two
threads stepping it take every step whole and count each once; separate
optimizers still step in parallel, bit-identical to sequential runs."""

import threading
import time

import numpy as np
import pytest

import fastdescent as fd
from rule_cases import RICHEST
from support import random_array
from test_optim import RULES, assert_same, make_grads, make_params

N = 1 << 16  # large enough that a kernel releases the GIL for a while


def run_threads(*targets):
    errors = []
    start = threading.Barrier(len(targets))

    def wrapped(target):
        try:
            start.wait()
            target()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=wrapped, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("name", list(RICHEST))
def test_two_threads_stepping_one_optimizer_take_every_step_whole(name, rng):
    """The gradient is the same at every step, so 2 x 25 serialized steps equal 50
    sequential ones bit for bit, whatever the interleaving; the count is 50."""
    cls, config = RULES[RICHEST[name].name]
    params = make_params(rng, np.float32, [(N,), (N // 3,)], rule=RICHEST[name].name)
    grads = make_grads(rng, params, 1)[0]
    shared = cls([p.copy() for p in params], **config, n_threads=1)
    alone = cls([p.copy() for p in params], **config, n_threads=1)

    def steps():
        for _ in range(25):
            shared.step(grads)
    run_threads(steps, steps)
    for _ in range(50):
        alone.step(grads)
    assert_same(shared, alone)
    if shared.spec.counts_steps:
        assert all(s["step"] == 50 for s in shared.state.values())


def test_a_state_dict_taken_during_steps_is_whole(rng):
    """state_dict waits for the step in progress: the step count and the buffers it
    holds belong to one step."""
    params = make_params(rng, np.float32, [(N,)])
    grads = make_grads(rng, params, 1)[0]
    opt = fd.Adam([params[0].copy()], lr=0.01, n_threads=1)
    reference = fd.Adam([params[0].copy()], lr=0.01, n_threads=1)
    snapshots = {}
    done = threading.Event()

    def steps():
        for _ in range(30):
            opt.step(grads)
            time.sleep(1e-3)  # between steps the other thread gets the lock
        done.set()

    def save():
        while not done.is_set():
            state = opt.state_dict()["state"]
            if state:  # none before the first step
                snapshots[state[0]["step"]] = state[0]["exp_avg"]
    run_threads(steps, save)
    for step in range(1, 31):
        reference.step(grads)
        if step in snapshots:
            np.testing.assert_array_equal(snapshots[step], reference.state[0]["exp_avg"])
    assert snapshots


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("name", list(RICHEST))
def test_separate_optimizers_in_parallel_equal_sequential_runs(name, n_threads, rng):
    cls, config = RULES[RICHEST[name].name]
    params = [make_params(rng, np.float32, [(N,), (999,)], rule=RICHEST[name].name) for _ in range(2)]
    grad_steps = [make_grads(rng, p, 10) for p in params]

    def make():
        return [cls([p.copy() for p in ps], **config, n_threads=n_threads) for ps in params]
    parallel, sequential = make(), make()

    def run(opt, steps):
        def target():
            for grads in steps:
                opt.step(grads)
        return target
    run_threads(*[run(o, s) for o, s in zip(parallel, grad_steps)])
    for o, s in zip(sequential, grad_steps):
        run(o, s)()
    for a, b in zip(parallel, sequential):
        assert_same(a, b)


def test_faces_on_separate_arrays_in_parallel_equal_sequential_calls(rng):
    arrays = [[random_array(rng, N, np.float32) for _ in range(4)] for _ in range(2)]
    for a in arrays:
        a[3] = np.abs(a[3])
    copies = [[x.copy() for x in a] for a in arrays]

    def steps(p, g, m, v):
        def target():
            for t in range(1, 11):
                fd.adam_step(p, g, m, v, step=t, lr=0.01, n_threads=1)
        return target
    run_threads(*[steps(*a) for a in arrays])
    for a in copies:
        steps(*a)()
    for a, b in zip(arrays, copies):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
