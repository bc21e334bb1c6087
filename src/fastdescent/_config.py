"""Process-wide defaults: thread count and backend.

Thread counts resolve the way scikit-learn's do: ``None`` means the OpenMP maximum
(``OMP_NUM_THREADS`` or the processor count) capped at the cores this process may
run on; a negative count counts back from that (-1 = all, -2 = all but one); 0 is an
error; a build without OpenMP always runs one thread.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from . import _runtime

BACKENDS = ("kernel", "reference")

_default_threads = None
_default_backend = None


def _max_threads():
    # OpenMP's own count of usable processors, not os.sched_getaffinity: with
    # OMP_PROC_BIND set, libgomp pins the importing thread to one core, and the
    # affinity of that thread would then cap us at one thread.
    if not _runtime.openmp_enabled():
        return 1
    return max(1, min(_runtime.omp_max_threads(), _runtime.omp_num_procs()))


# Read once: OMP_NUM_THREADS and the affinity mask are fixed for the process's life
# in practice, and asking on every step would cost more than a small update.
_MAX_THREADS = _max_threads()


def max_threads() -> int:
    """Threads a kernel may use: OpenMP's maximum capped at the usable cores."""
    return _MAX_THREADS


def _check_thread_request(n_threads):
    if n_threads is None:
        return
    if isinstance(n_threads, bool) or not isinstance(n_threads, int):
        raise TypeError(f"n_threads must be an int or None, got {n_threads!r}")
    if n_threads == 0:
        raise ValueError("n_threads=0 is invalid: use None for the default, -1 for all cores")


def effective_n_threads(n_threads: int | None = None) -> int:
    """The number of threads a kernel will use for the request ``n_threads``.

    ``None`` takes the process default (``set_num_threads``), itself ``None`` =
    all usable cores unless set.
    """
    if n_threads is None:
        n_threads = _default_threads
    else:
        _check_thread_request(n_threads)
    limit = _MAX_THREADS
    if n_threads is None:
        return limit
    if n_threads < 0:
        return max(1, limit + 1 + n_threads)
    return min(n_threads, limit)


def set_num_threads(n_threads: int | None) -> None:
    """Set the process-wide default thread count (``None`` restores "all cores")."""
    global _default_threads
    _check_thread_request(n_threads)
    _default_threads = n_threads


def get_num_threads() -> int:
    """The number of threads a kernel uses when called with ``n_threads=None``."""
    return effective_n_threads(None)


@contextmanager
def num_threads(n_threads: int | None) -> Iterator[None]:
    """Context manager: ``with fastdescent.num_threads(1): ...`` runs serial kernels."""
    global _default_threads
    _check_thread_request(n_threads)
    previous = _default_threads
    _default_threads = n_threads
    try:
        yield
    finally:
        _default_threads = previous


def _check_backend(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _backend_from_env():
    env = os.environ.get("FASTDESCENT_BACKEND", "").strip() or "kernel"
    if env not in BACKENDS:
        raise ValueError(f"FASTDESCENT_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


_ENV_BACKEND = _backend_from_env()


def get_backend() -> str:
    """The default backend: ``set_backend``, else ``FASTDESCENT_BACKEND`` (read at
    import), else "kernel"."""
    return _ENV_BACKEND if _default_backend is None else _default_backend


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend ("kernel" or "reference"; None = from env)."""
    global _default_backend
    _default_backend = None if name is None else _check_backend(name)


def resolve_backend(backend: str | None) -> ModuleType:
    """The backend module (kernels or reference) for ``backend`` (None = default)."""
    if backend is None:
        backend = _ENV_BACKEND if _default_backend is None else _default_backend
    try:
        return _BACKEND_MODULES[backend]
    except KeyError:
        _check_backend(backend)
        from . import reference
        from ._dispatch import kernels

        _BACKEND_MODULES.update(kernel=kernels, reference=reference)
        return _BACKEND_MODULES[backend]


_BACKEND_MODULES: dict[str, ModuleType] = {}
