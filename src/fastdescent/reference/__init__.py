"""The reference backend: every rule in plain NumPy, written from its equations.

Each function here has the same name, signature and in-place contract as its
kernel in ``fastdescent._kernels_*`` (the ``n_threads`` argument is accepted and
ignored), so the functional faces can call either. It is the oracle of the
equivalence tests and the "reference mode" users can switch to
(``backend="reference"`` or ``FASTDESCENT_BACKEND=reference``).

The public functions of every public module of this package are collected here,
so that a rule's twin is one new module.
"""

import importlib
import inspect
import pkgutil


def _find_twins():
    twins = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, value in vars(module).items():
            if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_"):
                if name in twins:
                    raise ImportError(f"two reference functions are named {name!r}")
                twins[name] = value
    return twins


_TWINS = _find_twins()
globals().update(_TWINS)
__all__ = sorted(_TWINS)
