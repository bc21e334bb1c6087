import zlib

import numpy as np
import pytest

import fastdescent
from fastdescent import _config, _dispatch


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fresh data per test, the same every run
    (``hash`` would be salted per process)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=_dispatch.supported_variants())
def kernel_variant(request, monkeypatch):
    """Run a test against each kernel build this CPU supports."""
    module = _dispatch.load_variant(request.param)
    _config.resolve_backend("reference")  # fill the backend cache before patching it
    monkeypatch.setitem(_config._BACKEND_MODULES, "kernel", module)
    return request.param


@pytest.fixture
def tiny_parts():
    """Let threads split even tiny updates, to exercise part boundaries."""
    kernels = _dispatch.kernels
    previous = (kernels.get_min_elements_per_thread(), kernels.get_min_elements_per_thread(cold=True))
    kernels.set_min_elements_per_thread(1)
    for name in _dispatch.supported_variants():
        _dispatch.load_variant(name).set_min_elements_per_thread(1)
    yield
    for name in _dispatch.supported_variants():
        _dispatch.load_variant(name).set_min_elements_per_thread(*previous)


@pytest.fixture(scope="session", autouse=True)
def _one_blas_thread():
    """NumPy's matrix products (Muon's Newton-Schulz iteration, the MLP) on one BLAS
    thread. Both backends call the same products, so no comparison depends on it;
    but OpenBLAS's threads busy-wait for each other, and beside the kernels' own
    threads on a 2-core machine one product took 20-40x its one-thread time."""
    try:
        import threadpoolctl
    except ImportError:  # a test extra: without it, the products keep their threads
        yield
        return
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(autouse=True)
def _restore_defaults():
    yield
    fastdescent.set_num_threads(None)
    fastdescent.set_backend(None)
