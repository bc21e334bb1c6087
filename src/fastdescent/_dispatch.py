"""Choose the kernel build for this CPU.

setup.py compiles the same kernel source once per instruction-set variant
(``fastdescent._kernels_<variant>``). At import we take the widest variant that was
built and that this CPU and operating system can run. ``FASTDESCENT_CPU=<variant>``
forces one, and refuses a variant this machine cannot run. Every variant computes
bit-identical results (no FMA contraction, no fast-math), so the choice changes only
the speed.
"""

import importlib
import os

from . import _runtime
from ._build_info import BUILD_INFO

#: Narrowest first.
VARIANTS = ("baseline", "avx2", "avx512")


def built_variants():
    return [v for v in VARIANTS if v in BUILD_INFO["variants"]]


def supported_variants():
    """Variants that were built and that this CPU can run."""
    return [v for v in built_variants() if _runtime.cpu_supports(v)]


def _choose():
    forced = os.environ.get("FASTDESCENT_CPU", "").strip()
    if forced:
        if forced not in VARIANTS:
            raise ImportError(f"FASTDESCENT_CPU={forced!r} is not a variant; choose from {VARIANTS}")
        if forced not in built_variants():
            raise ImportError(f"FASTDESCENT_CPU={forced!r}: that variant was not built (built: {built_variants()})")
        if not _runtime.cpu_supports(forced):
            raise ImportError(f"FASTDESCENT_CPU={forced!r}: this CPU cannot run it (supported: {supported_variants()})")
        return forced, "forced by FASTDESCENT_CPU"
    best = supported_variants()[-1]
    return best, "widest variant this CPU supports"


def load_variant(name):
    """The kernel module of variant ``name`` (for tests and benchmarks)."""
    if name not in supported_variants():
        raise ValueError(f"kernel variant {name!r} is not available here (available: {supported_variants()})")
    return importlib.import_module(f"fastdescent._kernels_{name}")


variant, reason = _choose()
kernels = importlib.import_module(f"fastdescent._kernels_{variant}")
