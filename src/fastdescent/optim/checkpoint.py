"""Checkpoint files: one ``.npz`` holding the arrays and a JSON header, never a pickle.

Layout (format version 1): a NumPy ``.npz`` archive (a zip of ``.npy`` files, each
checked by its CRC-32 when read) with

* ``__header__``: UTF-8 JSON as a uint8 array: ``{"format", "version", ...}`` plus
  whatever the caller stores; nested Python values are encoded by :func:`encode`;
* one member per array the encoded values refer to.

Files are written atomically: to a temporary file in the same directory, flushed
and fsynced, then renamed over the target (and the directory fsynced), so a crash
or an error leaves either the old checkpoint or the new one, never half of one.
Everything is read with ``allow_pickle=False``.
"""

import contextlib
import json
import math
import os
import secrets

import numpy as np

FORMAT = "fastdescent-checkpoint"
VERSION = 1
HEADER = "__header__"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, or does not fit this optimizer."""


# JSON has no tuples, non-string keys, non-finite floats or arrays; these tags carry
# them. A dict whose keys are plain strings stays a JSON object.
_TAGS = ("__tuple__", "__items__", "__float__", "__array__")


def encode(value, arrays):
    """``value`` as JSON-ready data; its arrays are added to ``arrays`` (name -> ndarray).

    Handles None, bool, int, float (also inf and nan), str, list, tuple, dict (any
    keys of these types), NumPy arrays (not of object dtype) and NumPy scalars;
    anything else raises TypeError, before any file is touched.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.hasobject:
            raise TypeError("cannot save an array of Python objects in a checkpoint")
        name = f"arrays/{len(arrays)}"
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        if array.dtype.name == "bfloat16":  # .npy has no bfloat16: its bits, as uint16
            arrays[name] = array.view(np.uint16)
            return {"__array__": name, "scalar": isinstance(value, np.generic), "dtype": "bfloat16"}
        arrays[name] = array
        return {"__array__": name, "scalar": isinstance(value, np.generic)}
    if isinstance(value, list):
        return [encode(v, arrays) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, arrays) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: encode(v, arrays) for k, v in value.items()}
        return {"__items__": [[encode(k, arrays), encode(v, arrays)] for k, v in value.items()]}
    raise TypeError(f"cannot save a {type(value).__name__} in a checkpoint")


def decode(data, arrays):
    """Inverse of :func:`encode`; CheckpointError if the data does not fit."""
    if isinstance(data, list):
        return [decode(v, arrays) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tuple__" in data:
        return tuple(decode(v, arrays) for v in data["__tuple__"])
    if "__items__" in data:
        return {_hashable(decode(k, arrays)): decode(v, arrays) for k, v in data["__items__"]}
    if "__float__" in data:
        return float(data["__float__"])
    if "__array__" in data:
        try:
            array = arrays[data["__array__"]]
        except KeyError:
            raise CheckpointError(f"the header refers to a missing array {data['__array__']!r}") from None
        if data.get("dtype") == "bfloat16":
            if array.dtype != np.uint16:
                raise CheckpointError(f"the bfloat16 array {data['__array__']!r} is stored as {array.dtype}")
            import ml_dtypes

            array = array.view(ml_dtypes.bfloat16)
        return array[()] if data.get("scalar") else array
    return {k: decode(v, arrays) for k, v in data.items()}


def _hashable(key):
    if isinstance(key, list):
        raise CheckpointError("a dict key in the checkpoint is a list")
    return key


def write(path, header, arrays):
    """Write ``header`` (JSON-ready, from :func:`encode`) and ``arrays`` to ``path`` atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    text = json.dumps({"format": FORMAT, "version": VERSION, **header}, allow_nan=False)
    members = {HEADER: np.frombuffer(text.encode("utf-8"), dtype=np.uint8), **arrays}
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never write through someone else's file; mode 0o666 minus the umask.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **members)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    """Make the rename itself durable (best effort: not every system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(path):
    """``(header, arrays)`` from a checkpoint file; CheckpointError if it is not a
    readable fastdescent checkpoint of a version this code knows.

    A missing file raises FileNotFoundError as usual.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if HEADER not in names:
                raise CheckpointError(f"{path} is not a fastdescent checkpoint (no header)")
            header = json.loads(bytes(archive[HEADER]).decode("utf-8"))
            arrays = {name: archive[name] for name in sorted(names - {HEADER})}
    except (CheckpointError, FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # truncated, corrupted (CRC), not a zip, bad JSON...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastdescent checkpoint")
    version = header.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this fastdescent reads up to {VERSION}")
    return header, arrays
