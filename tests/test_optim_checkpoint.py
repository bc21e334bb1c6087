"""Checkpoints: state dicts and files resume a run bit for bit (registered objects
included); every bad file or state dict raises and leaves the optimizer and its
registered objects as they were; a failed save leaves the existing file intact."""

import copy
import json
import os
import zipfile

import numpy as np
import pytest

import fastdescent as fd
from fastdescent.optim import checkpoint
from test_optim import RULES, assert_same, make_grads, make_params, snapshot_optimizer, take_steps
from rule_cases import RICHEST

CheckpointError = fd.CheckpointError


class Schedule:
    """A registered object with every kind of value a state dict may hold."""

    def __init__(self, seed=0):
        self.t = seed
        self.history = np.arange(3, dtype=np.int16) + seed

    def advance(self):
        self.t += 1
        self.history = np.append(self.history, self.t).astype(np.int16)

    def state_dict(self):
        return {"t": self.t, "history": self.history, "pair": (1, 2.5, "x"), "nan": float("nan"),
                "inf": -float("inf"), "by_int": {3: [None, True]}, "scale": np.float32(1.5),
                "nested": {"__tuple__": "a key that looks like a tag"}}

    def load_state_dict(self, sd):
        if not isinstance(sd.get("t"), int):
            raise ValueError("Schedule state needs an int 't'")
        self.t = sd["t"]
        self.history = sd["history"]


def assert_same_schedule(a, b):
    assert a.t == b.t
    np.testing.assert_array_equal(a.history, b.history)
    assert a.history.dtype == b.history.dtype


def model(rng, name=None):
    """Parameters of two groups, both dtypes, an empty array among them (in shapes the
    rule of example ``name`` takes)."""
    return (make_params(rng, np.float32, [(7,), (0,), (3, 40)], rule=name)
            + make_params(rng, np.float64, [(65,)], rule=name))


def build(name, params, flat=False):
    cls, config = RULES[name]
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
    opt = cls([{**g, "params": [p.copy() for p in g["params"]]} for g in groups], **config, flat=flat)
    schedule = Schedule()
    opt.register_state("schedule", schedule)
    return opt, schedule


def run_steps(opt, schedule, name, grad_steps, start=0):
    take_steps(opt, RULES[name][1], grad_steps, start)
    for _ in grad_steps:
        schedule.advance()


def fresh_like(name, rng, flat=False):
    """A new optimizer over new random parameters of the same shapes."""
    return build(name, model(rng, name), flat=flat)


def state_of(opt, schedule):
    return snapshot_optimizer(opt), copy.deepcopy(opt.param_groups), copy.deepcopy(schedule.state_dict())


def assert_unchanged(opt, schedule, before):
    optimizer, groups, schedule_state = before
    assert_same(opt, optimizer)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in groups]
    assert schedule.t == schedule_state["t"]
    np.testing.assert_array_equal(schedule.history, schedule_state["history"])


@pytest.mark.parametrize("layouts", [(False, False), (True, False), (False, True)], ids=["arrays", "flat-to-arrays",
                                                                                          "arrays-to-flat"])
@pytest.mark.parametrize("name", list(RULES))
def test_file_checkpoint_resumes_bit_identically(name, layouts, tmp_path, rng):
    params = model(rng, name)
    grad_steps = make_grads(rng, params, 6)
    uninterrupted, uninterrupted_schedule = build(name, params)
    run_steps(uninterrupted, uninterrupted_schedule, name, grad_steps)

    first, first_schedule = build(name, params, flat=layouts[0])
    run_steps(first, first_schedule, name, grad_steps[:3])
    path = tmp_path / "run.ckpt"
    first.save(path)
    del first

    resumed, resumed_schedule = fresh_like(name, rng, flat=layouts[1])
    resumed.load(path)
    run_steps(resumed, resumed_schedule, name, grad_steps[3:], start=3)
    assert_same(resumed, uninterrupted)
    assert_same_schedule(resumed_schedule, uninterrupted_schedule)


@pytest.mark.parametrize("name", [rule.name for rule in RICHEST.values()])
def test_state_dict_round_trip_resumes_bit_identically(name, rng):
    params = model(rng, name)
    grad_steps = make_grads(rng, params, 5)
    uninterrupted, uninterrupted_schedule = build(name, params)
    run_steps(uninterrupted, uninterrupted_schedule, name, grad_steps)
    first, first_schedule = build(name, params)
    run_steps(first, first_schedule, name, grad_steps[:2])
    sd = first.state_dict()
    assert sd["extra"]["schedule"]["t"] == 2
    resumed, resumed_schedule = build(name, [p.copy() for p in first.params])
    resumed.load_state_dict(sd)
    run_steps(resumed, resumed_schedule, name, grad_steps[2:], start=2)
    assert_same(resumed, uninterrupted)


def test_registered_state_keeps_its_types(tmp_path, rng):
    opt, schedule = build("adam", model(rng))
    schedule.advance()
    opt.save(tmp_path / "c")
    seen = {}

    class Recorder(Schedule):
        def load_state_dict(self, sd):
            seen.update(sd)
            super().load_state_dict(sd)

    other, _ = fresh_like("adam", rng)
    other._registered["schedule"] = Recorder()
    other.load(tmp_path / "c")
    expected = schedule.state_dict()
    assert seen.keys() == expected.keys()
    for key in ("t", "pair", "inf", "by_int", "nested"):
        assert seen[key] == expected[key] and type(seen[key]) is type(expected[key])
    assert np.isnan(seen["nan"])
    assert seen["scale"] == np.float32(1.5) and seen["scale"].dtype == np.float32
    assert seen["history"].dtype == np.int16


def test_file_is_an_npz_with_a_json_header_and_no_pickle(tmp_path, rng):
    opt, _ = build("adam", model(rng))
    opt.step(make_grads(rng, opt.params, 1)[0])
    opt.save(tmp_path / "c")
    with np.load(tmp_path / "c", allow_pickle=False) as archive:
        header = json.loads(bytes(archive["__header__"]).decode())
        assert header["format"] == checkpoint.FORMAT and header["version"] == checkpoint.VERSION
        assert header["optimizer"] == "Adam" and header["params"] == [{"__array__": f"params/{i}"} for i in range(4)]
        np.testing.assert_array_equal(archive["params/3"], opt.params[3])
    assert os.listdir(tmp_path) == ["c"]


def test_load_without_params_keeps_the_parameters(tmp_path, rng):
    opt, _ = build("adam", model(rng))
    opt.step(make_grads(rng, opt.params, 1)[0])
    opt.save(tmp_path / "c")
    other, _ = fresh_like("adam", rng)
    kept = [p.copy() for p in other.params]
    other.load(tmp_path / "c", params=False)
    assert_same((other.params, {}), (kept, {}))
    assert other.state[3]["step"] == 1


def test_save_is_atomic(tmp_path, rng, monkeypatch):
    """Written to a temporary file, flushed and fsynced, then renamed over the target."""
    opt, _ = build("sgd-momentum-dampening", model(rng))
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.dirname(a))),
                                                      real_replace(a, b))[1])
    opt.save(tmp_path / "c")
    assert events[0] == "fsync" and events[1] == ("replace", str(tmp_path))


# ------------------------------------------------------------ failed saves
def failing_savez(*args, **kwargs):
    f = args[0]
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("disk full")


@pytest.mark.parametrize("failure", ["unsavable state", "disk full", "rename fails"])
def test_an_existing_checkpoint_survives_a_failed_save(failure, tmp_path, rng, monkeypatch):
    opt, schedule = build("adam", model(rng))
    path = tmp_path / "run.ckpt"
    opt.save(path)
    saved = path.read_bytes()
    opt.step(make_grads(rng, opt.params, 1)[0])
    if failure == "unsavable state":
        schedule.history = {1, 2}  # a set: no checkpoint can hold it
        error = TypeError
    elif failure == "disk full":
        monkeypatch.setattr(np, "savez", failing_savez)
        error = OSError
    else:
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("read-only directory")))
        error = OSError
    with pytest.raises(error):
        opt.save(path)
    assert path.read_bytes() == saved
    assert os.listdir(tmp_path) == ["run.ckpt"], "a temporary file was left behind"
    monkeypatch.undo()
    other, _ = fresh_like("adam", rng)
    other.load(path)
    assert "step" not in other.state.get(0, {})  # the file is the old, complete one


# ------------------------------------------------------------- bad files
@pytest.fixture
def saved(tmp_path, rng):
    """A valid Adam checkpoint file and a different, running Adam to load it into."""
    source, _ = build("adam_amsgrad", model(rng))
    take_steps(source, RULES["adam_amsgrad"][1], make_grads(rng, source.params, 2))
    path = tmp_path / "good.ckpt"
    source.save(path)
    target, schedule = fresh_like("adam_amsgrad", rng)
    take_steps(target, RULES["adam_amsgrad"][1], make_grads(rng, target.params, 1))
    return path, target, schedule


def corrupt(path, tmp_path, how):
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.ckpt"
    if how == "truncated half":
        data = data[: len(data) // 2]
    elif how == "truncated tail":
        data = data[:-10]
    elif how == "empty":
        data = b""
    elif how == "garbage":
        data = bytes(range(256)) * 4
    elif how in ("array byte", "header byte"):
        with zipfile.ZipFile(path) as archive:
            member = "__header__.npy" if how == "header byte" else max(archive.infolist(), key=lambda i: i.file_size).filename
            info = archive.getinfo(member)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        data[start + info.file_size - 5] ^= 0x10
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("how", ["truncated half", "truncated tail", "empty", "garbage", "array byte", "header byte"])
def test_a_damaged_file_raises_and_changes_nothing(how, saved, tmp_path):
    path, target, schedule = saved
    before = state_of(target, schedule)
    with pytest.raises(CheckpointError):
        target.load(corrupt(path, tmp_path, how))
    assert_unchanged(target, schedule, before)


def test_any_flipped_byte_raises_or_loads_the_saved_content(saved, tmp_path, rng):
    path, target, schedule = saved
    reference, reference_schedule = fresh_like("adam_amsgrad", rng)
    reference.load(path)
    expected = state_of(reference, reference_schedule)
    size = path.stat().st_size
    for position in rng.choice(size, 40, replace=False):
        data = bytearray(path.read_bytes())
        data[position] ^= 0x01
        bad = tmp_path / "flipped.ckpt"
        bad.write_bytes(bytes(data))
        before = state_of(target, schedule)
        try:
            target.load(bad)
        except CheckpointError:
            assert_unchanged(target, schedule, before)
        else:  # the flip hit a field nothing reads (e.g. a zip timestamp)
            assert_unchanged(target, schedule, expected)


def test_other_files_raise(saved, tmp_path):
    path, target, schedule = saved
    before = state_of(target, schedule)
    np.save(tmp_path / "array.npy", np.arange(3.0))
    np.savez(tmp_path / "plain.npz", a=np.arange(3.0))
    header = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION + 1, "optimizer": "Adam"}
    np.savez(tmp_path / "newer.npz", __header__=np.frombuffer(json.dumps(header).encode(), np.uint8))
    for bad, match in [("array.npy", None), ("plain.npz", "not a fastdescent checkpoint"), ("newer.npz", "version")]:
        with pytest.raises(CheckpointError, match=match):
            target.load(tmp_path / bad)
    with pytest.raises(FileNotFoundError):
        target.load(tmp_path / "missing.ckpt")
    assert_unchanged(target, schedule, before)


def test_a_file_for_another_optimizer_raises(saved, tmp_path, rng):
    path, _, _ = saved
    for cls, config in [(fd.AdamW, {}), (fd.SGD, {}), (fd.RMSprop, {})]:
        params = model(rng)
        other = cls([{"params": params[:2]}, {"params": params[2:]}], **config)
        other.register_state("schedule", Schedule())
        before = snapshot_optimizer(other)
        with pytest.raises(CheckpointError, match=f"Adam optimizer, not a {cls.__name__}"):
            other.load(path)
        assert_same(other, before)


def mismatched_optimizers(rng):
    """(description, optimizer) pairs whose parameters do not fit the saved file."""
    p = model(rng)
    shapes = make_params(rng, np.float32, [(7,), (0,), (3, 41)]) + p[3:]
    dtypes = p[:3] + make_params(rng, np.float32, [(65,)])
    return [
        ("a shape", fd.Adam([{"params": shapes[:2]}, {"params": shapes[2:]}], amsgrad=True)),
        ("a dtype", fd.Adam([{"params": dtypes[:2]}, {"params": dtypes[2:]}], amsgrad=True)),
        ("the groups", fd.Adam([{"params": p[:3]}, {"params": p[3:]}], amsgrad=True)),
        ("the group count", fd.Adam(p, amsgrad=True)),
        ("one parameter more", fd.Adam([{"params": p[:2]}, {"params": p[2:] + make_params(rng, np.float32, [(2,)])}])),
    ]


@pytest.mark.parametrize("index", range(5))
def test_mismatched_parameters_raise_and_change_nothing(index, saved, rng):
    path, _, _ = saved
    description, target = mismatched_optimizers(rng)[index]
    schedule = Schedule(seed=5)
    target.register_state("schedule", schedule)
    grads = make_grads(rng, target.params, 1)[0]
    target.step(grads)
    before = state_of(target, schedule)
    with pytest.raises(CheckpointError):
        target.load(path)
    assert_unchanged(target, schedule, before)


def bad_state_dicts(sd):
    """(description, modified state dict) for state dicts load_state_dict must refuse."""
    def changed(edit):
        new = copy.deepcopy(sd)
        edit(new)
        return new
    return [
        ("no state", changed(lambda d: d.pop("state"))),
        ("negative lr", changed(lambda d: d["param_groups"][1].update(lr=-1.0))),
        ("missing hyperparameter", changed(lambda d: d["param_groups"][0].pop("eps"))),
        ("steps differ in a group", changed(lambda d: d["state"][3].update(step=7) or d["state"][2].update(step=1))),
        ("float step", changed(lambda d: d["state"][0].update(step=1.5))),
        ("negative step", changed(lambda d: [s.update(step=-1) for s in d["state"].values()])),
        ("unknown entry", changed(lambda d: d["state"][0].update(momentum_buffer=d["state"][0]["exp_avg"]) or
                                  d["state"][0].update(velocity=d["state"][0]["exp_avg"]))),
        ("missing max_exp_avg_sq with amsgrad", changed(lambda d: [s.pop("max_exp_avg_sq") for s in d["state"].values()])),
        ("state on one parameter of a group only", changed(lambda d: d["state"].pop(1))),
        ("state for an unknown parameter", changed(lambda d: d["state"].update({9: d["state"][0]}))),
        ("a buffer of the wrong shape", changed(lambda d: d["state"][2].update(exp_avg=np.zeros(3, np.float32)))),
        ("a buffer of the wrong dtype", changed(lambda d: d["state"][3].update(exp_avg=d["state"][3]["exp_avg"].astype(np.float32)))),
        ("a list as a buffer", changed(lambda d: d["state"][3].update(exp_avg=list(d["state"][3]["exp_avg"])))),
        ("a registered object refuses", changed(lambda d: d["extra"]["schedule"].update(t="later"))),
        ("unregistered extra", changed(lambda d: d["extra"].update(ema={}))),
        ("missing extra", changed(lambda d: d.pop("extra"))),
    ]


@pytest.mark.parametrize("index", range(16))
def test_a_bad_state_dict_raises_and_changes_nothing(index, saved, rng):
    _, target, schedule = saved
    source, _ = fresh_like("adam_amsgrad", rng)
    take_steps(source, RULES["adam_amsgrad"][1], make_grads(rng, source.params, 3))
    description, sd = bad_state_dicts(source.state_dict())[index]
    before = state_of(target, schedule)
    with pytest.raises((TypeError, ValueError)):
        target.load_state_dict(sd)
    assert_unchanged(target, schedule, before)


def test_registered_objects_are_restored_when_a_later_one_fails(rng):
    opt, schedule = build("adam", model(rng))
    refusing = Schedule(seed=3)
    opt.register_state("z_refusing", refusing)
    sd = opt.state_dict()
    sd["extra"]["schedule"]["t"] = 42
    sd["extra"]["z_refusing"]["t"] = None
    with pytest.raises(ValueError, match="int 't'"):
        opt.load_state_dict(sd)
    assert schedule.t == 0 and refusing.t == 3


def test_strict_loading_of_registered_objects(rng):
    source, source_schedule = build("adam", model(rng))
    source_schedule.advance()
    sd = source.state_dict()
    bare = fd.Adam([{"params": model(rng)[:2]}, {"params": model(rng)[2:]}])
    with pytest.raises(ValueError, match="register_state"):
        bare.load_state_dict(sd)
    bare.load_state_dict(sd, strict=False)
    other, schedule = fresh_like("adam", rng)
    other.register_state("ema", Schedule())
    other.load_state_dict(sd, strict=False)
    assert schedule.t == 1


def test_register_state_validation(rng):
    opt, _ = build("adam", model(rng))
    with pytest.raises(ValueError, match="already registered"):
        opt.register_state("schedule", Schedule())
    with pytest.raises(TypeError, match="state_dict"):
        opt.register_state("x", object())
    with pytest.raises(TypeError):
        opt.register_state("", Schedule())
