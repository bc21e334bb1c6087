"""The bench command and the bandwidth kernel: they run and report well-formed
results. No timing is asserted here (speed lives in BENCHMARKS.md and asv_bench/)."""

import argparse
import json

import numpy as np
import pytest

from fastdescent import _dispatch
from fastdescent.__main__ import main
from fastdescent.bench import cases, size_arg
from fastdescent.catalog import RULES
from support import DTYPES, assert_bitwise_equal, random_array

TINY = ["--sizes", "1000", "--repeats", "1", "--min-time", "0", "--quiet"]
TIMED_FIELDS = ("melem_per_s", "gb_per_s", "ceiling_fraction", "vs_reference", "vs_torch_fused", "vs_1_thread")


def run_bench(tmp_path, *options):
    path = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--json", str(path), *options]) == 0
    return json.loads(path.read_text())


def test_bench_json_is_well_formed(tmp_path, capsys):
    result = run_bench(tmp_path, "--rules", "sgd_momentum", "--many", "3x100", "--overhead-size", "50")
    tables = capsys.readouterr().out
    assert "sgd_momentum, float32" in tables and "many small arrays" in tables and "per-call overhead" in tables
    assert result["config"]["variant"] == _dispatch.variant
    records = result["records"]
    assert {r["case"] for r in records} == {"sizes", "many", "overhead"}
    for r in records:
        assert r["rule"] == "sgd_momentum" and r["dtype"] == "float32"
        assert r["bytes_per_element"] == RULES["sgd_momentum"].bytes_per_element("float32")
        assert ("seconds" in r) != ("unavailable" in r)
        if "seconds" in r:
            s = r["seconds"]
            assert 0 < s["min"] <= s["median"] <= s["max"] and s["calls"] >= 1 and s["samples"] == 1
            assert all(field in r for field in TIMED_FIELDS)
            assert r["melem_per_s"] > 0 and r["gb_per_s"] > 0
    timed = {(r["case"], r["size"], r["tensors"], r["method"], r["threads"]) for r in records if "seconds" in r}
    max_threads = result["options"]["threads"][-1]
    for threads in result["options"]["threads"]:
        assert ("sizes", 1000, 1, "ceiling", threads) in timed
        assert ("sizes", 1000, 1, "kernel", threads) in timed
    assert ("sizes", 1000, 1, "reference", 1) in timed
    assert ("many", 100, 3, "kernel", max_threads) in timed and ("many", 300, 1, "kernel", max_threads) in timed
    assert ("overhead", 50, 1, "kernel", 1) in timed
    kernel = next(r for r in records if r["case"] == "sizes" and r["method"] == "kernel" and r["threads"] == 1)
    assert kernel["ceiling_fraction"] > 0 and kernel["vs_reference"] > 0
    if cases.torch_or_none() is not None:
        assert ("sizes", 1000, 1, "torch-fused", 1) in timed
        assert kernel["vs_torch_fused"] > 0


def test_saved_run_renders_the_same_tables(tmp_path, capsys):
    path = tmp_path / "bench.json"
    main(["bench", *TINY, "--rules", "sgd", "--cases", "sizes", "--methods", "kernel", "reference",
          "--json", str(path)])
    live = capsys.readouterr().out
    assert main(["bench", "--from-json", str(path)]) == 0
    assert capsys.readouterr().out == live


def test_every_variant_and_threshold(tmp_path):
    previous = _dispatch.kernels.get_min_elements_per_thread()
    result = run_bench(tmp_path, "--rules", "sgd", "--cases", "sizes", "--methods", "kernel",
                       "--variants", "all", "--threads", "1", "--min-elements-per-thread", "4096")
    kernels = [r for r in result["records"] if r["method"] == "kernel"]
    assert [r["variant"] for r in kernels] == _dispatch.supported_variants()
    assert result["config"]["min_elements_per_thread"] == 4096  # in force during the run
    assert _dispatch.kernels.get_min_elements_per_thread() == previous  # and restored after it


def test_idle_times_each_call_alone(tmp_path, capsys):
    result = run_bench(tmp_path, "--rules", "sgd", "--cases", "sizes", "--methods", "kernel",
                       "--threads", "1", "--idle", "0.001", "--repeats", "2")
    assert "busy waiting" in capsys.readouterr().out
    timed = [r for r in result["records"] if "seconds" in r]
    assert {r["method"] for r in timed} == {"ceiling", "kernel"}
    assert all(r["seconds"]["calls"] == 1 and r["seconds"]["samples"] == 2 for r in timed)


def test_rounds_pool_the_samples_of_each_method(tmp_path, monkeypatch):
    order = []
    real_stepper = cases.stepper

    def recording_stepper(method, *args, **kwargs):
        order.append(method)
        return real_stepper(method, *args, **kwargs)

    monkeypatch.setattr("fastdescent.bench.stepper", recording_stepper)
    result = run_bench(tmp_path, "--rules", "sgd", "--cases", "sizes", "--methods", "kernel", "reference",
                       "--threads", "1", "--repeats", "2", "--rounds", "3")
    timed = [r for r in result["records"] if "seconds" in r]
    assert {r["method"] for r in timed} == {"ceiling", "kernel", "reference"}
    assert all(r["seconds"]["samples"] == 6 for r in timed)
    assert order == ["ceiling", "kernel", "reference"] * 3  # the methods take turns
    with pytest.raises(SystemExit, match="--rounds"):
        main(["bench", *TINY, "--rounds", "0"])


def test_rounds_record_the_calls_every_sample_averages(tmp_path, monkeypatch):
    """--rounds R: the first turn of a measurement finds how many calls a sample
    averages and the other turns take as many, so the recorded count is that of
    every sample (it was the first turn's, the others having found their own)."""
    turns = []
    real = cases.time_samples

    def recording(step, *args, calls=None, **kwargs):
        result = real(step, *args, calls=calls, **kwargs)
        turns.append((calls, result[0]))
        return result

    monkeypatch.setattr("fastdescent.bench.time_samples", recording)
    result = run_bench(tmp_path, "--rules", "sgd", "--cases", "sizes", "--methods", "kernel", "--threads", "1",
                       "--repeats", "2", "--rounds", "3", "--min-time", "0.002")
    timed = {r["method"]: r["seconds"] for r in result["records"] if "seconds" in r}
    assert list(timed) == ["ceiling", "kernel"]
    for k, method in enumerate(timed):  # the methods take turns: ceiling, kernel, ceiling...
        first, *later = turns[k::2]
        assert first[0] is None and all(given == used == first[1] for given, used in later)
        assert timed[method]["calls"] == first[1] > 1 and timed[method]["samples"] == 6


def test_time_samples_with_a_given_count_makes_that_many_calls():
    made = []
    calls, samples = cases.time_samples(lambda: made.append(1), repeats=3, min_time=10.0, calls=4)
    assert calls == 4 and len(samples) == 3 and len(made) == 1 + 3 * 4  # (a warm-up call)


@pytest.mark.parametrize("text, value", [("1000", 1000), ("1e5", 10**5), ("10**8", 10**8), ("100_000", 10**5)])
def test_size_arg(text, value):
    assert size_arg(text) == value


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "ten", "1e-3", "2**x"])
def test_size_arg_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        size_arg(text)


def test_steps_case_takes_the_state_dtype_axis(tmp_path, capsys):
    """``--cases steps --state-dtypes``: a table per state dtype; the face (and the
    flat arena of int8 blocks) are left out there, with the reason."""
    result = run_bench(tmp_path, "--cases", "steps", "--steps-shapes", "2x300", "--steps-rules", "adam",
                       "--state-dtypes", "native", "int8")
    tables = capsys.readouterr().out
    assert "per-step cost, adam float32, 1 thread(s)" in tables
    assert "per-step cost, adam float32 with int8 state (torch fused: float32), 1 thread(s)" in tables
    records = {(r["state_dtype"], r["method"]): r for r in result["steps"]["records"]}
    assert {state for state, _ in records} == {None, "int8"}
    for method in ("face", "optimizer", "optimizer-flat"):
        assert "seconds" in records[None, method]
    assert "seconds" in records["int8", "optimizer"]
    assert "unavailable" in records["int8", "face"] and "unavailable" in records["int8", "optimizer-flat"]


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not available"):
        main(["bench", *TINY, "--variants", "sse9"])


def test_reference_runs_single_threaded():
    rule = RULES["sgd"]
    problem = cases.make_problem(rule, 10, "float32")
    with pytest.raises(cases.Unavailable):
        with cases.stepper("reference", rule, problem, n_threads=2):
            pass
    with pytest.raises(ValueError, match="method"):
        with cases.stepper("numba", rule, problem):
            pass


def test_steps_change_the_parameters():
    rule = RULES["nesterov"]
    problem = cases.make_problem(rule, 300, "float64", n_tensors=3)
    before = [p.copy() for p in problem.params]
    with cases.stepper("kernel", rule, problem) as step:
        step()
    assert all(not np.array_equal(p, b) for p, b in zip(problem.params, before))


# The bandwidth kernel: every supported pattern, both dtypes, one or several tensors.
PATTERNS = [(1, 0), (2, 0), (1, 1), (2, 1), (2, 2), (3, 2), (4, 3), (5, 4), (4, 4)]


def stream_of(variant):
    return _dispatch.load_variant(variant).stream


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("reads, writes", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stream_leaves_values_unchanged(reads, writes, dtype, n_threads, rng, tiny_parts):
    sizes = [0, 1, 7, 4097, 130]
    arrays = [[random_array(rng, n, dtype) for n in sizes] for _ in range(reads)]
    before = [[a.copy() for a in role] for role in arrays]
    for variant in _dispatch.supported_variants():
        stream_of(variant)(arrays, writes, n_threads)
        stream_of(variant)([role[3] for role in arrays], writes, n_threads)  # one array per role
    for role, copies in zip(arrays, before):
        for a, b in zip(role, copies):
            assert_bitwise_equal(a, b)


@pytest.mark.parametrize("reads, writes", [(1, 2), (3, 1), (6, 5), (3, 0), (0, 0)])
def test_stream_refuses_unsupported_patterns(reads, writes, rng):
    arrays = [random_array(rng, 10, np.float32) for _ in range(reads)]
    with pytest.raises(ValueError, match="stream supports"):
        _dispatch.kernels.stream(arrays, writes, 1)


def test_stream_refuses_bad_buffers(rng):
    a, b = random_array(rng, 10, np.float32), random_array(rng, 10, np.float32)
    a.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _dispatch.kernels.stream([a, b], 1, 1)
    with pytest.raises(ValueError, match="one array per tensor"):
        _dispatch.kernels.stream([[b, b.copy()], [b]], 1, 1)
    with pytest.raises(ValueError, match="equal sizes"):
        _dispatch.kernels.stream([b, random_array(rng, 11, np.float32)], 1, 1)
    with pytest.raises(ValueError, match="one dtype"):
        _dispatch.kernels.stream([b, random_array(rng, 10, np.float64)], 1, 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        _dispatch.kernels.stream([np.arange(10, dtype=np.int32)], 0, 1)


def test_a_rule_of_several_passes_is_measured_by_its_passes(tmp_path):
    """Adafactor: a matrix (its factored case), its three memory passes counted in its
    bytes and run by the ceiling one after the other."""
    rule = RULES["adafactor"]
    assert rule.passes == [(2, 0), (1, 0), (2, 1)]
    assert rule.bytes_per_element("float32") == (5 + 1) * 4
    problem = cases.make_problem(rule, 1000, "float32")
    assert problem.params.shape == problem.grads.shape == (25, 40)
    assert [None if s is None else s.shape for s in problem.state] == [(25, 1), (1, 40), None]
    assert [(len(roles), written) for roles, written in cases.ceiling_passes(rule, problem)] == [(2, 0), (1, 0), (2, 1)]
    result = run_bench(tmp_path, "--rules", "adafactor", "--cases", "sizes", "--methods", "kernel", "reference")
    timed = {(r["method"], r["threads"]) for r in result["records"] if "seconds" in r}
    assert ("ceiling", 1) in timed and ("kernel", 1) in timed and ("reference", 1) in timed
    assert all(r["bytes_per_element"] == 24 for r in result["records"])


def test_the_accumulate_case_runs_and_renders(tmp_path, capsys):
    result = run_bench(tmp_path, "--cases", "accumulate", "--accumulate-sizes", "5000", "--accumulate-threads", "1")
    records = result["accumulate"]["records"]
    assert [r["method"] for r in records] == ["ceiling", "fused", "unfused", "add", "step", "zero"]
    assert {r["method"]: r["bytes_per_element"] for r in records}["fused"] == 36
    assert {r["method"]: r["bytes_per_element"] for r in records}["unfused"] == 44
    assert all(r["seconds"]["median"] > 0 for r in records)
    assert "gradient accumulation, Adam float32" in capsys.readouterr().out


def test_state_dtype_axis_and_memory(tmp_path, capsys):
    """--state-dtypes: the kernel's stored pass against the ceiling of its own byte
    count (read off the spec), beside torch's float32 state; the memory case."""
    result = run_bench(tmp_path, "--rules", "adam", "sgd", "--cases", "sizes", "memory", "--state-dtypes",
                       "float32", "bfloat16", "int8", "--methods", "kernel", "reference", "torch-fused",
                       "torch-adapter")
    tables = capsys.readouterr().out
    assert "adam, float32, state bfloat16" in tables and "adam, float32, state int8" in tables
    assert "optimizer state memory" in tables
    records = result["records"]
    sized = {(r["rule"], r["state_dtype"], r["method"]): r for r in records if r["case"] == "sizes"}
    assert ("sgd", "bfloat16", "kernel") not in sized  # plain SGD keeps no state
    assert sized["adam", "bfloat16", "kernel"]["bytes_per_element"] == 20
    assert sized["adam", "int8", "kernel"]["bytes_per_element"] == 16 + 16 / 256
    assert sized["adam", "int8", "ceiling"]["bytes_per_element"] == 16 + 16 / 256
    if cases.torch_or_none() is not None:
        assert sized["adam", "int8", "torch-fused"]["bytes_per_element"] == 28
        assert sized["adam", "int8", "torch-adapter"]["bytes_per_element"] == 16 + 16 / 256  # state_dtype too
        assert sized["adam", None, "torch-adapter"]["bytes_per_element"] == 28
        assert sized["adam", "int8", "kernel"]["vs_torch_fused"] > 0
    for state_dtype in ("bfloat16", "int8"):
        assert sized["adam", state_dtype, "kernel"]["ceiling_fraction"] > 0
    memory = {(r["rule"], r["state_dtype"]): r["bytes_per_param"] for r in records if r["case"] == "memory"}
    assert memory["adam", None] == pytest.approx(8, abs=0.1)
    assert memory["adam", "bfloat16"] == pytest.approx(4, abs=0.1)
    assert memory["adam", "int8"] == pytest.approx(2 + 8 / 256, abs=0.1)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_stream_mixed_leaves_values_unchanged(n_threads, rng, tiny_parts):
    sizes = [0, 1, 7, 4097, 130]
    dtypes = [np.float32, np.uint16, np.int8, np.uint8, np.float32]
    arrays = [[random_array(rng, n, np.float32).view(np.uint32).astype(dtype) for n in sizes] for dtype in dtypes]
    before = [[a.copy() for a in role] for role in arrays]
    for variant in _dispatch.supported_variants():
        _dispatch.load_variant(variant).stream_mixed(arrays, 4, n_threads)
    for role, copies in zip(arrays, before):
        for a, b in zip(role, copies):
            assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="equal element counts"):
        _dispatch.kernels.stream_mixed([np.zeros(4, np.int8), np.zeros(5, np.float32)], 1, 1)
