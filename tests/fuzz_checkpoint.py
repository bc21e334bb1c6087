"""Fuzz the checkpoint loader (CI runs this; pytest does not collect it).

Every input is loaded into a running optimizer with every registrable object
(checkpoint_cases.LoadProperty): it must raise CheckpointError and change nothing,
or load exactly the saved state. Anything else (another exception, a changed
optimizer, different content) is a crash.

    python tests/fuzz_checkpoint.py sweep            # every single-bit flip of the file
    python tests/fuzz_checkpoint.py atheris -runs=N  # coverage-guided (pip install atheris);
                                                     # further arguments go to libFuzzer
"""

import os
import sys
import tempfile
import time

#: What the fuzzer instruments for coverage: the loader and the parsers it relies on
#: (instrumenting everything loaded, NumPy included, takes minutes).
INSTRUMENTED = ["fastdescent.optim.checkpoint", "zipfile", "json", "numpy.lib._format_impl", "ast"]


def sweep(prop):
    data = prop.original
    loaded = 0
    start = time.perf_counter()
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        loaded += prop.check(bytes(flipped))
    print(f"{len(data) * 8} single-bit flips of a {len(data)}-byte checkpoint: {loaded} loaded the saved state "
          f"(unread zip fields), {len(data) * 8 - loaded} raised CheckpointError; "
          f"{time.perf_counter() - start:.1f} s")


def fuzz(prop, directory, libfuzzer_args):
    import atheris

    corpus = os.path.join(directory, "corpus")
    os.mkdir(corpus)
    with open(os.path.join(corpus, "saved.ckpt"), "wb") as f:
        f.write(prop.original)
    arguments = [sys.argv[0], corpus, f"-max_len={len(prop.original) + 512}",
                 f"-artifact_prefix={os.path.join(directory, '')}", *libfuzzer_args]
    print("atheris:", " ".join(arguments[1:]), flush=True)
    atheris.Setup(arguments, prop.check)
    atheris.Fuzz()


def main(argv):
    if not argv or argv[0] not in ("sweep", "atheris"):
        sys.exit(__doc__)
    if argv[0] == "atheris":
        import atheris

        with atheris.instrument_imports(include=INSTRUMENTED):
            import ast, json, zipfile  # noqa: F401, E401  (imported first here, to be instrumented)

            import fastdescent.optim.checkpoint  # noqa: F401
            try:
                import numpy.lib._format_impl  # noqa: F401  (NumPy 2; NumPy 1's numpy.lib.format goes uninstrumented)
            except ImportError:
                pass
    from checkpoint_cases import LoadProperty

    with tempfile.TemporaryDirectory() as directory:
        prop = LoadProperty(directory)
        assert prop.check(prop.original)
        if argv[0] == "sweep":
            sweep(prop)
        else:
            fuzz(prop, directory, argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
