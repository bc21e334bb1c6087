"""Checkpoint integrity (issue 14, defects 2, 6, 7 and 9): every byte of a file is
verified before anything changes, files nothing refers to or that would inflate are
refused, registered objects' states are validated, killed saves leave nothing behind.

Each test builds its damaged file by hand: re-zipped with correct CRCs where the
point is that only the new checks (the JSON's shapes, dtypes and SHA-256) catch it.
"""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastdescent as fd
from checkpoint_cases import advance, build, same, snapshot
from fastdescent.optim import checkpoint

CheckpointError = fd.CheckpointError


class Recorder:
    """A registered object that keeps whatever it is given: only the file format
    stands between a damaged array and the training run."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.state = {"history": rng.integers(0, 1000, 12).astype(np.int16),
                      "matrix": rng.standard_normal((3, 4))}

    def state_dict(self):
        return {k: v.copy() for k, v in self.state.items()}

    def load_state_dict(self, state):
        self.state = dict(state)


def optimizer_with_recorder(seed, n=5000):
    """An Adam over one array large enough that zip streams it in several reads."""
    rng = np.random.default_rng(seed)
    opt = fd.Adam([rng.standard_normal(n).astype(np.float32)], lr=0.01)
    opt.step([rng.standard_normal(n).astype(np.float32)])
    recorder = Recorder(seed)
    opt.register_state("recorder", recorder)
    return opt, recorder


def everything(opt, recorder):
    return snapshot(opt), recorder.state_dict()


@pytest.fixture
def saved(tmp_path):
    """(path of a saved file, a different running optimizer, its recorder)."""
    source, _ = optimizer_with_recorder(1)
    path = tmp_path / "run.ckpt"
    source.save(path)
    target, recorder = optimizer_with_recorder(2)
    return path, target, recorder


def assert_refused(path, target, recorder, match=None):
    before = everything(target, recorder)
    with pytest.raises(CheckpointError, match=match):
        target.load(path)
    assert same(everything(target, recorder), before)


def members(path):
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def rezip(members_, out, compression=zipfile.ZIP_STORED):
    """A zip of ``members_`` (name -> bytes), CRCs and sizes all correct."""
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members_.items():
            archive.writestr(name, data)
    return out


def npy(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def header_of(files):
    return json.loads(bytes(np.load(io.BytesIO(files["__header__.npy"]))).decode())


def with_header(files, header):
    return {**files, "__header__.npy": npy(np.frombuffer(json.dumps(header).encode(), np.uint8))}


def member_of(header, *keys):
    """The member name of the array at ``header["state_dict"][keys...]``."""
    node = header["state_dict"]
    for key in keys:
        node = node[key]
    return node["__array__"] + ".npy"


# --------------------------------------------------- 2: corrupted data, header
def test_a_flipped_npy_header_length_raises(saved, tmp_path):
    """Issue 14's case: bit 5 of a member's .npy header length (118 -> 86) loaded the
    array shifted by 8 elements, garbage first, because zip checks a CRC-32 only
    when a member is read to its end."""
    path, target, recorder = saved
    data = path.read_bytes()
    starts = [i for i in range(len(data) - 10) if data[i:i + 10] == b"\x93NUMPY\x01\x00\x76\x00"]
    assert len(starts) >= 4
    for start in starts:
        flipped = bytearray(data)
        flipped[start + 8] ^= 0x20
        (tmp_path / "bad.ckpt").write_bytes(bytes(flipped))
        assert_refused(tmp_path / "bad.ckpt", target, recorder)


def test_data_changed_under_a_valid_crc_raises(saved, tmp_path):
    """Zip's CRC-32 recomputed over damaged data: the SHA-256 in the header catches it."""
    path, target, recorder = saved
    files = members(path)
    name = member_of(header_of(files), "extra", "recorder", "matrix")
    array = np.load(io.BytesIO(files[name]))
    array[1, 2] = np.nextafter(array[1, 2], np.inf)
    files[name] = npy(array)
    assert_refused(rezip(files, tmp_path / "bad.ckpt"), target, recorder, match="SHA-256")


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_an_array_unlike_its_declaration_raises(change, saved, tmp_path):
    """Same bytes (so the same hash), other shape or dtype in the .npy header."""
    path, target, recorder = saved
    files = members(path)
    name = member_of(header_of(files), "extra", "recorder", "history")
    history = np.load(io.BytesIO(files[name]))
    files[name] = npy(history.reshape(3, 4) if change == "shape" else history.view(np.uint16))
    assert_refused(rezip(files, tmp_path / "bad.ckpt"), target, recorder, match=change)


def test_the_header_records_each_arrays_dtype_shape_and_hash(saved):
    path, _, _ = saved
    files = members(path)
    header = header_of(files)
    assert header["version"] == 2
    assert set(header["arrays"]) == {name[:-4] for name in files} - {"__header__"}
    entry = header["arrays"][member_of(header, "extra", "recorder", "history")[:-4]]
    assert entry["dtype"] == "<i2" and entry["shape"] == [12] and len(entry["sha256"]) == 64


# ------------------------------------------------- 7: members nothing refers to
def test_a_member_nothing_refers_to_raises(saved, tmp_path):
    path, target, recorder = saved
    files = members(path)
    files["arrays/99.npy"] = npy(np.arange(10.0))
    assert_refused(rezip(files, tmp_path / "bad.ckpt"), target, recorder, match="nothing refers to")


def test_an_inflating_member_is_refused_before_decompression(saved, tmp_path):
    """A 64 MiB array deflated to 64 KiB: refused with a few MiB allocated at most."""
    path, target, recorder = saved
    files = members(path)
    files["arrays/99.npy"] = npy(np.zeros(1 << 23))
    bomb = rezip(files, tmp_path / "bomb.ckpt", zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        assert_refused(bomb, target, recorder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_size_unlike_the_npy_header_raises(saved, tmp_path):
    """A .npy header that promises more data than the member holds."""
    path, target, recorder = saved
    files = members(path)
    name = member_of(header_of(files), "extra", "recorder", "matrix")
    files[name] = files[name][:-8]
    assert_refused(rezip(files, tmp_path / "bad.ckpt"), target, recorder, match="implies")


def test_a_header_referring_to_an_array_twice_raises(saved, tmp_path):
    path, target, recorder = saved
    files = members(path)
    header = header_of(files)
    header["state_dict"]["extra"]["recorder"]["history"] = header["state_dict"]["extra"]["recorder"]["matrix"]
    del files[member_of(header_of(files), "extra", "recorder", "history")]
    del header["arrays"][member_of(header_of(files), "extra", "recorder", "history")[:-4]]
    assert_refused(rezip(with_header(files, header), tmp_path / "bad.ckpt"), target, recorder, match="twice")


def test_version_1_files_still_load_with_their_checks(tmp_path):
    """Files written before the hashes: params counted, no array table."""
    source, source_recorder = optimizer_with_recorder(1)
    arrays = {}
    header = {"format": checkpoint.FORMAT, "version": 1, "optimizer": "Adam",
              "state_dict": checkpoint.encode(source.state_dict(), arrays), "params": 1}
    arrays["params/0"] = source.params[0]
    np.savez(tmp_path / "v1.npz", __header__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    target, recorder = optimizer_with_recorder(2)
    target.load(tmp_path / "v1.npz")
    assert same(everything(target, recorder), everything(source, source_recorder))

    files = members(tmp_path / "v1.npz")
    files["arrays/99.npy"] = npy(np.arange(3.0))
    other, other_recorder = optimizer_with_recorder(3)
    assert_refused(rezip(files, tmp_path / "extra.npz"), other, other_recorder, match="nothing refers to")


# -------------------------------------------- 9: registered objects' states
def _drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _set(key, value):
    return lambda state: {**state, key: value}


BAD_REGISTERED_STATES = {
    "Scheduler without last_step (issue 14)": ("lr", _drop("last_step")),
    "Scheduler with an unknown entry": ("lr", _set("epoch", 3)),
    "Scheduler scale not a list": ("lr", _set("scale", 0.5)),
    "Scheduler negative step": ("lr", _set("last_step", -1)),
    "Scheduler state not a dict": ("lr", lambda state: [1, 2, 3]),
    "ReduceLROnPlateau without best": ("plateau", _drop("best")),
    "ReduceLROnPlateau bad cooldown after good entries": ("plateau", lambda s: {**s, "best": -5.0,
                                                                               "cooldown_counter": "x"}),
    "EarlyStopping should_stop not a bool": ("stop", _set("should_stop", "yes")),
    "EarlyStopping best_params of other shapes": ("stop", _set("best_params", [np.zeros(2, np.float32),
                                                                              np.zeros((2, 2))])),
    "EarlyStopping without best_epoch": ("stop", _drop("best_epoch")),
    "EMA without averages": ("ema", _drop("averages")),
    "EMA averages as lists": ("ema", lambda s: {**s, "averages": [a.tolist() for a in s["averages"]]}),
    "SWA n_averaged beyond the kernel's count": ("swa", _set("n_averaged", 2**63)),
    "SWA averages of another dtype": ("swa", lambda s: {**s, "averages": [a.astype(np.float16)
                                                                           for a in s["averages"]]}),
}


def bad_source(case):
    source, objects, rng = build(seed=1)
    advance(source, objects, rng, 3)
    name, edit = BAD_REGISTERED_STATES[case]
    state = edit(objects[name].state_dict())
    objects[name].state_dict = lambda: state
    return source


def target_optimizer():
    target, objects, rng = build(seed=2)
    advance(target, objects, rng, 2)
    return target


@pytest.mark.parametrize("case", list(BAD_REGISTERED_STATES))
def test_a_bad_registered_state_in_a_file_raises_checkpoint_error(case, tmp_path):
    bad_source(case).save(tmp_path / "bad.ckpt")
    target = target_optimizer()
    before = snapshot(target)
    with pytest.raises(CheckpointError):
        target.load(tmp_path / "bad.ckpt")
    assert same(snapshot(target), before)


@pytest.mark.parametrize("case", list(BAD_REGISTERED_STATES))
def test_a_bad_registered_state_dict_raises_type_or_value_error(case):
    sd = bad_source(case).state_dict()
    target = target_optimizer()
    before = snapshot(target)
    with pytest.raises((TypeError, ValueError)):
        target.load_state_dict(sd)
    assert same(snapshot(target), before)


def test_any_lookup_error_of_a_registered_object_becomes_checkpoint_error(saved, tmp_path):
    path, target, recorder = saved

    class Strict(Recorder):
        def load_state_dict(self, state):
            self.state = {"history": state["history"], "missing": state["absent"]}

    target._registered["recorder"] = strict = Strict(5)
    assert_refused(path, target, strict, match="absent")


# ------------------------------------------------------- 6: killed saves
def temporaries(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def test_a_save_removes_temporary_files_of_dead_saves_of_its_target(tmp_path):
    opt, _, _ = build(seed=1)
    stale = [".run.ckpt.0123456789ab.tmp", ".run.ckpt.ba9876543210.tmp"]
    others = [".run.ckpt.tmp", ".run.ckpt.xyz.tmp", ".other.ckpt.0123456789ab.tmp", ".run.ckpt.0123456789ab.tmp.keep"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"PK\x03\x04 half a checkpoint")
    opt.save(tmp_path / "run.ckpt")
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["run.ckpt"])


def test_a_save_leaves_the_temporary_file_of_a_save_in_progress(tmp_path):
    import fcntl

    opt, _, _ = build(seed=1)
    live = tmp_path / ".run.ckpt.00000000cafe.tmp"
    live.write_bytes(b"being written")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a save does until it renames its file
        opt.save(tmp_path / "run.ckpt")
        assert temporaries(tmp_path) == [live.name]
    opt.save(tmp_path / "run.ckpt")
    assert temporaries(tmp_path) == []


KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import fastdescent as fd

    opt = fd.Adam([np.ones(1000, np.float32)])
    def stop_here(fd_):  # the file is written but not yet renamed: be killed now
        print("writing", flush=True)
        time.sleep(600)
    os.fsync = stop_here
    opt.save(sys.argv[1])
""")


def test_a_save_killed_with_sigkill_leaves_nothing_after_the_next_save(tmp_path):
    opt, objects, rng = build(seed=1)
    path = tmp_path / "run.ckpt"
    opt.save(path)
    package_root = os.path.dirname(os.path.dirname(fd.__file__))  # this fastdescent, wherever it is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"writing\n"
        assert len(temporaries(tmp_path)) == 1
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert len(temporaries(tmp_path)) == 1
    advance(opt, objects, rng, 1)
    opt.save(path)
    assert temporaries(tmp_path) == []
    other, _, _ = build(seed=2)
    other.load(path)
    assert same(snapshot(other), snapshot(opt))
