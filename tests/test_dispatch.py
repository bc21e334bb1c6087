"""Instruction-set dispatch: which kernel build runs, and forcing one."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastdescent import _dispatch, _runtime


def test_the_widest_supported_variant_is_chosen():
    if os.environ.get("FASTDESCENT_CPU"):
        pytest.skip("variant forced by FASTDESCENT_CPU")
    assert _dispatch.variant == _dispatch.supported_variants()[-1]
    assert _dispatch.kernels.__name__ == f"fastdescent._kernels_{_dispatch.variant}"


def test_baseline_is_always_built_and_supported():
    assert _dispatch.built_variants()[0] == "baseline"
    assert _runtime.cpu_supports("baseline")
    with pytest.raises(ValueError, match="unknown kernel variant"):
        _runtime.cpu_supports("sse9")


def test_this_machine_runs_avx512_when_the_cpu_has_it():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f " not in flags or "avx512" not in _dispatch.built_variants():
        pytest.skip("no AVX-512 here or not built")
    assert "avx512" in _dispatch.supported_variants()


def _import_with(variant):
    code = "import fastdescent._dispatch as d; print(d.variant, d.reason)"
    env = dict(os.environ, FASTDESCENT_CPU=variant)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_forcing_a_supported_variant():
    out = _import_with("baseline")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("baseline forced by FASTDESCENT_CPU")


def test_forcing_an_unknown_variant_raises():
    out = _import_with("avx1024")
    assert out.returncode != 0 and "FASTDESCENT_CPU='avx1024' is not a variant" in out.stderr


def test_forcing_a_variant_the_cpu_cannot_run_raises(monkeypatch):
    widest = _dispatch.built_variants()[-1]
    if widest == "baseline":
        pytest.skip("only the baseline was built")
    monkeypatch.setenv("FASTDESCENT_CPU", widest)
    monkeypatch.setattr(_runtime, "cpu_supports", lambda v: v == "baseline")
    with pytest.raises(ImportError, match="this CPU cannot run it"):
        _dispatch._choose()


def test_variants_give_identical_results(rng):
    """Dispatch never changes a number: every variant matches the first bit for bit."""
    p0 = rng.standard_normal(10_001).astype(np.float32)
    g = rng.standard_normal(10_001).astype(np.float32)
    b0 = rng.standard_normal(10_001).astype(np.float32)
    results = []
    for name in _dispatch.supported_variants():
        p, b = p0.copy(), b0.copy()
        _dispatch.load_variant(name).sgd(
            [p], [g], [b], lr=0.01, grad_scale=1.0, weight_decay=1e-3, momentum=0.9,
            dampening=0.1, nesterov=False, classical=False, first_step=False, n_threads=1)
        results.append((p, b))
    for p, b in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        np.testing.assert_array_equal(b, results[0][1])
