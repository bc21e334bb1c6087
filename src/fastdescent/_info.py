"""``fastdescent.show_config()``: how this installation was built and what it runs."""

import platform
from typing import IO, Any

from . import _config, _dispatch, _runtime
from ._build_info import BUILD_INFO


def config() -> dict[str, Any]:
    """The configuration as a dict (what ``show_config`` prints)."""
    from . import __version__

    return {
        "version": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "openmp": _runtime.openmp_enabled(),
        "max_threads": _config.max_threads(),
        "default_threads": _config.get_num_threads(),
        "backend": _config.get_backend(),
        "compiler": BUILD_INFO["compiler"],
        "common_flags": BUILD_INFO["common_flags"],
        "variants_built": {v: BUILD_INFO["variants"][v] for v in _dispatch.built_variants()},
        "variants_supported": _dispatch.supported_variants(),
        "variant": _dispatch.variant,
        "variant_reason": _dispatch.reason,
        "min_elements_per_thread": _dispatch.kernels.get_min_elements_per_thread(),
        "min_elements_per_thread_cold": _dispatch.kernels.get_min_elements_per_thread(cold=True),
        "spin_seconds": _dispatch.kernels.get_spin_seconds(),
    }


def _idle_workers(spin_seconds: float) -> str:
    if spin_seconds == float("inf"):
        return "idle workers spin (OMP_WAIT_POLICY=active)"
    if spin_seconds == 0:
        return "idle workers park at once (OMP_WAIT_POLICY=passive)"
    return f"idle workers spin {spin_seconds * 1e3:g} ms, then park"


def show_config(file: IO[str] | None = None) -> None:
    """Print the version, OpenMP, threads, compiler, flags and kernel variant."""
    c = config()
    flags = " ".join(c["common_flags"])
    lines = [
        f"fastdescent {c['version']} (Python {c['python']}, {c['machine']})",
        f"  OpenMP:           {'on' if c['openmp'] else 'OFF (serial build)'}",
        f"  threads:          {c['default_threads']} by default, {c['max_threads']} at most"
        f" (serial below {2 * c['min_elements_per_thread']:,} elements, or"
        f" {2 * c['min_elements_per_thread_cold']:,} when the workers are parked;"
        f" {_idle_workers(c['spin_seconds'])})",
        f"  backend:          {c['backend']}",
        f"  compiler:         {c['compiler']}",
        f"  common flags:     {flags}",
        "  variants built:   "
        + ", ".join(f"{v} [{' '.join(f) or 'no -march'}]" for v, f in c["variants_built"].items()),
        f"  CPU can run:      {', '.join(c['variants_supported'])}",
        f"  kernels in use:   {c['variant']} ({c['variant_reason']})",
    ]
    print("\n".join(lines), file=file)
