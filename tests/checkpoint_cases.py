"""A small checkpoint holding every kind of state fastdescent saves, and the property
every load of arbitrary bytes must have: it raises CheckpointError and changes
nothing, or it restores exactly the saved state. Shared by test_fuzz_checkpoint.py
(pytest) and fuzz_checkpoint.py (the atheris fuzzer CI runs)."""

import math
import os
import struct

import numpy as np

import fastdescent as fd
from fastdescent.schedules import cosine, warmup


def build(seed):
    """An AMSGrad Adam over two groups of each dtype, with every registrable object."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(3).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float64)]
    opt = fd.Adam([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.1}], lr=0.01, amsgrad=True)
    schedule = fd.Scheduler(opt, warmup(cosine(0.01, 100), 5))
    objects = {
        "lr": schedule,
        "plateau": fd.ReduceLROnPlateau(schedule, patience=1),
        "stop": fd.EarlyStopping(opt, patience=3, restore_best=True),
        "ema": fd.EMA(opt, decay=0.9),
        "swa": fd.SWA(opt, start=2),
    }
    for name, obj in objects.items():
        opt.register_state(name, obj)
    return opt, objects, rng


def advance(opt, objects, rng, steps):
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in opt.params])
        for name in ("lr", "ema", "swa"):
            objects[name].step()
        metric = float(rng.random())
        objects["stop"].step(metric)
        objects["plateau"].step(metric)


def snapshot(opt):
    """Everything a load may change: parameters, state, hyperparameters, registered objects."""
    return [p.copy() for p in opt.params], opt.state_dict()  # copies its arrays, as registered objects do


def same(a, b):
    """Equal in type, structure and bits (NaN payloads and the sign of zero included)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    return a == b


class LoadProperty:
    """Loads bytes into one running optimizer and checks what happened.

    ``original`` is the saved file. :meth:`check` returns True if the bytes loaded
    (and then the optimizer holds exactly the saved state), False if the load
    raised CheckpointError (and then nothing changed); anything else fails.
    """

    def __init__(self, directory):
        source, objects, rng = build(seed=1)
        advance(source, objects, rng, 4)
        path = os.path.join(directory, "saved.ckpt")
        source.save(path)
        with open(path, "rb") as f:
            self.original = f.read()
        self.expected = snapshot(source)
        self.target, target_objects, rng = build(seed=2)
        advance(self.target, target_objects, rng, 2)
        self.current = snapshot(self.target)
        self.scratch = os.path.join(directory, "mutated.ckpt")

    def check(self, data):
        _overwrite(self.scratch, data)
        try:
            self.target.load(self.scratch)
        except fd.CheckpointError:
            assert same(snapshot(self.target), self.current), "a refused load changed the optimizer"
            return False
        self.current = snapshot(self.target)
        assert same(self.current, self.expected), "a load succeeded with content that was not saved"
        return True


def _overwrite(path, data):
    """Write ``data`` to ``path`` in place: truncating a file to zero first makes ext4
    flush it on close (its rename-safety heuristic), a thousand times slower."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
