"""Defaults: thread count and backend.

Thread counts resolve the way scikit-learn's do. The ceiling is read on every call:
``omp_get_max_threads()`` of the calling thread (``OMP_NUM_THREADS``, or a
``threadpoolctl.threadpool_limits(n, user_api="openmp")`` block), capped at the
cores this process may run on. Under it, a request of ``None`` means the default:
the innermost ``with num_threads(n)`` block of the calling thread, else the
process-wide ``set_num_threads(n)``, else the ceiling. A negative count counts back
from the ceiling (-1 = all, -2 = all but one); 0 is an error; a build without
OpenMP always runs one thread.

The defaults and that resolution live in one C object, :data:`CALL_DEFAULTS`
(``_runtime.CallDefaults``): the functions here read and write it, and the C paths
of the faces and the step plans call it directly.
"""

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from . import _runtime

BACKENDS = ("kernel", "reference")

# ``(n_threads,)`` of the innermost ``num_threads`` block, None outside any. A context
# variable is per Python thread (and per asyncio task), and cheaper to read than
# threading.local.
_block_threads: contextvars.ContextVar[tuple[int | None] | None] = contextvars.ContextVar(
    "fastdescent_num_threads", default=None)


def max_threads() -> int:
    """Threads a kernel may use now, in this thread: OpenMP's maximum (which
    threadpoolctl limits) capped at the usable cores."""
    # OpenMP's own count of usable processors, not os.sched_getaffinity: with
    # OMP_PROC_BIND set, libgomp pins the importing thread to one core, and the
    # affinity of that thread would then cap us at one thread.
    return _runtime.thread_limit()


def _check_thread_request(n_threads):
    if n_threads is None:
        return
    if isinstance(n_threads, bool) or not isinstance(n_threads, int):
        raise TypeError(f"n_threads must be an int or None, got {n_threads!r}")
    if n_threads == 0:
        raise ValueError("n_threads=0 is invalid: use None for the default, -1 for all cores")


def effective_n_threads(n_threads: int | None = None) -> int:
    """The number of threads a kernel will use for the request ``n_threads``.

    ``None`` takes the default: this thread's ``num_threads`` block, else
    ``set_num_threads``, else all usable cores. Never more than OpenMP's maximum
    for this thread (``OMP_NUM_THREADS``, threadpoolctl).
    """
    return CALL_DEFAULTS.threads(n_threads)


def set_num_threads(n_threads: int | None) -> None:
    """Set the process-wide default thread count (``None`` restores "all cores").
    A ``num_threads`` block in a thread takes precedence there."""
    _check_thread_request(n_threads)
    CALL_DEFAULTS.default_threads = n_threads


def get_num_threads() -> int:
    """The number of threads a kernel uses when called with ``n_threads=None``."""
    return effective_n_threads(None)


@contextmanager
def num_threads(n_threads: int | None) -> Iterator[None]:
    """Context manager: ``with fastdescent.num_threads(1): ...`` runs serial kernels.

    It sets the default of the calling Python thread (and asyncio task) only, so
    blocks in several threads may overlap and each restores its own previous value.
    """
    _check_thread_request(n_threads)
    token = _block_threads.set((n_threads,))
    try:
        yield
    finally:
        _block_threads.reset(token)


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
    name = CALL_DEFAULTS.default_backend
    return _ENV_BACKEND if name is None else name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend ("kernel" or "reference"; None = from env)."""
    CALL_DEFAULTS.default_backend = None if name is None else _check_backend(name)


def resolve_backend(backend: str | None) -> ModuleType:
    """The backend module (kernels or reference) for ``backend`` (None = default)."""
    return CALL_DEFAULTS.backend(backend)


def _load_backend(name):
    """The module of backend ``name``, the backends imported on first use (ValueError
    for an unknown name)."""
    _check_backend(name)
    from . import reference
    from ._dispatch import kernels

    _BACKEND_MODULES.update(kernel=kernels, reference=reference)
    return _BACKEND_MODULES[name]


_BACKEND_MODULES: dict[str, ModuleType] = {}
#: The defaults and their resolution (see the module docstring).
CALL_DEFAULTS = _runtime.CallDefaults(_block_threads, _BACKEND_MODULES, _ENV_BACKEND, _check_thread_request,
                                      _load_backend)
