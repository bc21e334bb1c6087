import os

import pytest

import fastdescent as fd
from fastdescent import _config, _dispatch, _runtime


def test_thread_resolution():
    limit = _config.max_threads()
    assert fd.effective_n_threads(None) == limit
    assert fd.effective_n_threads(1) == 1
    assert fd.effective_n_threads(10_000) == limit
    assert fd.effective_n_threads(-1) == limit
    assert fd.effective_n_threads(-limit - 5) == 1
    with pytest.raises(ValueError):
        fd.effective_n_threads(0)
    with pytest.raises(TypeError):
        fd.effective_n_threads(1.5)


def test_default_threads_and_context_manager():
    fd.set_num_threads(1)
    assert fd.get_num_threads() == 1
    with fd.num_threads(-1):
        assert fd.get_num_threads() == _config.max_threads()
    assert fd.get_num_threads() == 1
    with pytest.raises(ValueError):
        fd.set_num_threads(0)
    assert fd.get_num_threads() == 1


def test_serial_build_gives_one_thread():
    if not _runtime.openmp_enabled():
        assert fd.effective_n_threads(None) == 1 and fd.effective_n_threads(4) == 1


@pytest.mark.skipif(bool(os.environ.get("FASTDESCENT_SKIP_OPENMP_TEST")), reason="FASTDESCENT_SKIP_OPENMP_TEST is set")
def test_build_has_openmp():
    assert _runtime.openmp_enabled(), "built without OpenMP; set FASTDESCENT_SKIP_OPENMP_TEST=1 if intended"
    assert _config.max_threads() >= 1


def test_backend_switch():
    assert fd.get_backend() in ("kernel", "reference")
    fd.set_backend("reference")
    assert fd.get_backend() == "reference"
    with pytest.raises(ValueError):
        fd.set_backend("cuda")


def test_show_config_reports_the_build(capsys):
    fd.show_config()
    out = capsys.readouterr().out
    assert "OpenMP" in out and _dispatch.variant in out and "-ffp-contract=off" in out


def test_pinned_openmp_threads_do_not_cap_the_thread_count():
    """OMP_PROC_BIND pins the importing thread; the default must still use every core."""
    import subprocess
    import sys

    code = "import fastdescent as fd, fastdescent._runtime as r; print(fd.get_num_threads(), r.omp_num_procs())"
    env = dict(os.environ, OMP_PROC_BIND="close", OMP_PLACES="cores")
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    threads, procs = map(int, out.stdout.split())
    assert threads == (procs if _runtime.openmp_enabled() else 1)
