"""Build the fastdescent extension modules.

All metadata lives in pyproject.toml; this file only declares the extensions:

* ``fastdescent._runtime``: OpenMP queries, CPU feature detection and buffer
  validation. Built once, for the baseline instruction set.
* ``fastdescent._tensorviews``: NumPy views of torch gradients for
  ``fastdescent.torch`` (never imports torch). Built once, like ``_runtime``.
* ``fastdescent._kernels_<variant>``: every update-rule kernel, compiled once per
  instruction-set variant from the same source (``src/kernels/kernels.pxi``); the
  variants differ only in compiler flags. ``fastdescent._dispatch`` picks one at
  import.

Environment variables:

* ``FASTDESCENT_DISABLE_OPENMP=1``: build without OpenMP (every kernel serial).
* ``FASTDESCENT_FAIL_NO_OPENMP=1``: a compiler without OpenMP is an error, not a warning.
* ``FASTDESCENT_VARIANTS=baseline,avx2``: build only these variants (default: all
  the compiler and the target architecture support).
* ``FASTDESCENT_VEC_REPORT=1``: print gcc's vectorization report
  (``-fopt-info-vec-optimized``, plus ``-missed`` with ``=missed``).
"""

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
KERNEL_DIR = ROOT / "src" / "kernels"
GENERATED_DIR = ROOT / "build" / "generated"

# No -ffast-math: results must be IEEE-exact and reproducible. -fno-math-errno lets
# gcc emit a vector sqrt instead of a scalar call that may set errno (measured: the
# Adam loop stays scalar without it). -ffp-contract=off forbids fusing a*b+c into an
# FMA, which would round differently from the NumPy reference and between variants.
COMMON_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]

# Instruction-set variants for x86-64, narrowest first. On other architectures only
# the baseline is built. x86-64-v4 is AVX-512 (F, BW, CD, DQ, VL); gcc's generic
# tuning would still prefer 256-bit vectors there, so ask for 512-bit ones.
X86_VARIANTS = {
    "baseline": [],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
}

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n == omp_get_max_threads());
        return 0;
    }
    """
)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def new_compiler():
    from setuptools._distutils.ccompiler import new_compiler as _new
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = _new()
    customize_compiler(compiler)
    return compiler


def compiler_works(flags, source="int main(void) { return 0; }\n", run=False):
    """Compile (and optionally run) ``source`` with ``flags``; True if it all succeeded."""
    compiler = new_compiler()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(source)
        try:
            objects = compiler.compile([str(src)], output_dir=tmp, extra_postargs=flags)
            exe = str(Path(tmp) / "probe")
            compiler.link_executable(objects, exe, extra_postargs=flags)
            if run:
                out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
                return out.returncode == 0 and out.stdout.strip() == "1"
        except Exception:
            return False
    return True


def openmp_flags():
    """``-fopenmp`` if the compiler builds and runs an OpenMP program, else []."""
    if env_flag("FASTDESCENT_DISABLE_OPENMP"):
        print("fastdescent: FASTDESCENT_DISABLE_OPENMP is set: building serial kernels")
        return []
    if compiler_works(["-fopenmp"], OPENMP_PROBE, run=True):
        return ["-fopenmp"]
    message = (
        "\n" + "*" * 78 + "\n"
        "fastdescent: the compiler could not build and run an OpenMP program.\n"
        "The kernels will be built SERIAL: every update runs on one thread.\n"
        "Install OpenMP support (e.g. gcc with libgomp) and rebuild, or set\n"
        "FASTDESCENT_FAIL_NO_OPENMP=1 to make this an error.\n" + "*" * 78
    )
    if env_flag("FASTDESCENT_FAIL_NO_OPENMP"):
        sys.exit(message)
    warnings.warn(message, stacklevel=1)
    return []


def variants():
    """The instruction-set variants to build, name -> extra flags."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        chosen = {name: flags for name, flags in X86_VARIANTS.items() if compiler_works(flags)}
    else:
        chosen = {"baseline": []}
    wanted = os.environ.get("FASTDESCENT_VARIANTS")
    if wanted:
        names = [w.strip() for w in wanted.split(",") if w.strip()]
        unknown = sorted(set(names) - set(chosen))
        if unknown:
            sys.exit(f"fastdescent: FASTDESCENT_VARIANTS names {unknown}; buildable here: {sorted(chosen)}")
        chosen = {name: chosen[name] for name in names}
    if "baseline" not in chosen:
        sys.exit("fastdescent: the baseline variant is always required")
    return chosen


def vec_report_flags():
    mode = os.environ.get("FASTDESCENT_VEC_REPORT", "").strip().lower()
    if mode in ("1", "true", "yes", "on"):
        return ["-fopt-info-vec-optimized"]
    if mode == "missed":
        return ["-fopt-info-vec-optimized", "-fopt-info-vec-missed"]
    return []


def compiler_version():
    cc = sysconfig.get_config_var("CC") or "cc"
    exe = shutil.which(cc.split()[0])
    if exe is None:
        return cc
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip()
    except Exception:
        return cc


def write_build_info(omp, variant_flags):
    """Record how this build was configured, for ``fastdescent.show_config()``."""
    info = {
        "openmp": bool(omp),
        "compiler": compiler_version(),
        "common_flags": COMMON_FLAGS + omp,
        "variants": variant_flags,
        "machine": platform.machine(),
    }
    path = ROOT / "src" / "fastdescent" / "_build_info.py"
    path.write_text(
        '"""Written by setup.py at build time; not tracked by git."""\n\n'
        f"BUILD_INFO = {info!r}\n"
    )


def extensions():
    omp = openmp_flags()
    variant_flags = variants()
    write_build_info(omp, variant_flags)
    report = vec_report_flags()
    numpy_include = numpy.get_include()
    # NPY_TARGET_VERSION keeps the modules importable with NumPy 1.25+ at run time.
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION"), ("NPY_TARGET_VERSION", "NPY_1_25_API_VERSION")]

    def extension(name, source, flags):
        return Extension(
            name,
            sources=[str(source)],
            include_dirs=[numpy_include, str(KERNEL_DIR)],
            define_macros=macros,
            extra_compile_args=COMMON_FLAGS + omp + flags + report,
            extra_link_args=omp,
        )

    exts = [extension("fastdescent._runtime", KERNEL_DIR / "_runtime.pyx", []),
            extension("fastdescent._tensorviews", KERNEL_DIR / "_tensorviews.pyx", [])]
    GENERATED_DIR.mkdir(parents=True, exist_ok=True)
    for name, flags in variant_flags.items():
        # One stub per variant: the same kernels.pxi under another module name.
        stub = GENERATED_DIR / f"_kernels_{name}.pyx"
        text = f'# Generated by setup.py: the "{name}" build of the kernels.\ninclude "kernels.pxi"\n'
        if not stub.exists() or stub.read_text() != text:
            stub.write_text(text)
        exts.append(extension(f"fastdescent._kernels_{name}", stub, flags))
    return cythonize(
        exts,
        include_path=[str(KERNEL_DIR)],
        build_dir=str(ROOT / "build" / "cython"),
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
        nthreads=os.cpu_count() or 1,
        quiet=True,
    )


class ParallelBuildExt(build_ext):
    """Compile the extension modules in parallel: there is one per variant."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


setup(ext_modules=extensions(), cmdclass={"build_ext": ParallelBuildExt})
