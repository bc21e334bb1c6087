"""Checkpoint files: one ``.npz`` holding the arrays and a JSON header, never a pickle.

Layout (format version 2): a NumPy ``.npz`` archive, an uncompressed zip of ``.npy``
members, with

* ``__header__``: UTF-8 JSON as a uint8 array: ``{"format", "version", "arrays",
  ...}`` plus whatever the caller stores; nested Python values are encoded by
  :func:`encode`, which refers to each array by its member name;
* one member per array; ``"arrays"`` in the header lists each one's dtype, shape
  and SHA-256 (of its bytes in C order).

Reading trusts nothing in the file (:func:`read`): the members must be exactly the
header and the arrays its table lists (every tag naming one of them), all stored
uncompressed, their declared sizes within the file and equal to what each ``.npy``
header implies, which must give the dtype and shape the JSON declares; every
member is read to its end (so zip checks its CRC-32) and every array's SHA-256
must match. Anything else raises :class:`CheckpointError` before the caller sees a
byte. An optimizer checkpoint (:func:`load`) must also refer to each array exactly
once. Version 1 files (no table: the arrays are those the header refers to) still
load, with every check but the JSON shapes and hashes.

Files are written atomically: to a temporary file in the same directory, flushed
and fsynced, then renamed over the target (and the directory fsynced), so a crash
or an error leaves either the old checkpoint or the new one, never half of one.
The writer holds an exclusive ``flock`` on its temporary file until the rename, so
the next save of the same target can tell the temporary files of killed saves
(unlocked) from those of saves in progress, and removes the former.
"""

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import zipfile

import numpy as np

FORMAT = "fastdescent-checkpoint"
VERSION = 2
HEADER = "__header__"
_NPY = ".npy"
_CHUNK = 1 << 22  # bytes read (and hashed) at a time


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
    try:
        return _decode(data, arrays)
    except RecursionError:
        raise CheckpointError("the checkpoint header is nested too deeply") from None


def _decode(data, arrays):
    if isinstance(data, list):
        return [_decode(v, arrays) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tuple__" in data:
        return tuple(_decode(v, arrays) for v in data["__tuple__"])
    if "__items__" in data:
        return {_hashable(_decode(k, arrays)): _decode(v, arrays) for k, v in data["__items__"]}
    if "__float__" in data:
        return float(data["__float__"])
    if "__array__" in data:
        try:
            array = arrays[data["__array__"]]
        except (KeyError, TypeError):
            raise CheckpointError(f"the header refers to a missing array {data['__array__']!r}") from None
        if data.get("dtype") == "bfloat16":
            if array.dtype != np.uint16:
                raise CheckpointError(f"the bfloat16 array {data['__array__']!r} is stored as {array.dtype}")
            import ml_dtypes

            array = array.view(ml_dtypes.bfloat16)
        return array[()] if data.get("scalar") else array
    return {k: _decode(v, arrays) for k, v in data.items()}


def _hashable(key):
    if isinstance(key, (list, dict)):
        raise CheckpointError(f"a dict key in the checkpoint is a {type(key).__name__}")
    return key


def _references(header):
    """Every array name an ``{"__array__": name}`` tag in ``header`` refers to, in order."""
    names, stack = [], [header]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            if "__array__" in item:
                names.append(item["__array__"])
            stack.extend(reversed(list(item.values())))
    return names


# ---------------------------------------------------------------- optimizers
def save(path, kind, state_dict, params=None):
    """Write an optimizer checkpoint: ``kind`` (the class name), its ``state_dict``
    and optionally its parameter values."""
    arrays = {}
    header = {"optimizer": kind, "state_dict": encode(state_dict, arrays)}
    if params is not None:
        header["params"] = []
        for i, p in enumerate(params):
            tag = {"__array__": f"params/{i}"}
            if p.dtype.name == "bfloat16":  # .npy has no bfloat16: its bits, as uint16
                p, tag["dtype"] = p.view(np.uint16), "bfloat16"
            arrays[f"params/{i}"] = p
            header["params"].append(tag)
    write(path, header, arrays)


def load(path, kind):
    """``(state_dict, params)`` from a checkpoint written by :func:`save` for ``kind``;
    ``params`` is None if the file holds no parameter values. CheckpointError if
    the file is unreadable, corrupted, malformed or for another optimizer class."""
    header, arrays = read(path)
    if header.get("optimizer") != kind:
        raise CheckpointError(f"{path} holds a {header.get('optimizer')} optimizer, not a {kind}")
    if header["version"] > 1:
        references = _references({k: v for k, v in header.items() if k != "arrays"})
        if sorted(references) != sorted(arrays):
            raise CheckpointError(f"{path}: an array is referred to twice, or by nothing")
    try:
        state_dict = decode(header["state_dict"], arrays)
        params = header.get("params")
        if params is not None:
            if header["version"] == 1:  # a count; the arrays are params/0, params/1...
                params = [arrays[f"params/{i}"] for i in range(params)]
            elif not isinstance(params, list):
                raise TypeError("'params' is not a list")
            else:
                params = decode(params, arrays)
    except CheckpointError:
        raise
    except (LookupError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: malformed checkpoint ({error!r})") from error
    return state_dict, params


# ------------------------------------------------------------------- writing
def write(path, header, arrays):
    """Write ``header`` (JSON-ready, from :func:`encode`) and ``arrays`` to ``path`` atomically."""
    path = os.fspath(path)
    directory, target = os.path.split(os.path.abspath(path))
    arrays = {name: a if a.flags.c_contiguous else a.copy(order="C") for name, a in arrays.items()}
    table = {name: {**_description(a), "sha256": hashlib.sha256(_raw_bytes(a)).hexdigest()}
             for name, a in arrays.items()}
    text = json.dumps({"format": FORMAT, "version": VERSION, **header, "arrays": table}, allow_nan=False)
    members = {HEADER: np.frombuffer(text.encode("utf-8"), dtype=np.uint8), **arrays}
    remove_stale_temporaries(path)
    fd, temporary = _locked_temporary(directory, target)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **members)
            f.flush()
            os.fsync(f.fileno())
            os.replace(temporary, path)  # while still locked: see remove_stale_temporaries
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _description(array):
    """What the JSON header declares of an array: dtype (as in a .npy header) and shape."""
    descr = np.lib.format.dtype_to_descr(array.dtype)
    return {"dtype": json.loads(json.dumps(descr)), "shape": list(array.shape)}


def _raw_bytes(array):
    """A C-contiguous array's bytes, without a copy."""
    return array.reshape(-1).view(np.uint8)


def _temporary_pattern(target):
    return re.compile(re.escape(f".{target}.") + r"[0-9a-f]{12}\.tmp")


def _locked_temporary(directory, target):
    """A new temporary file next to ``target``, open for writing and ``flock``-ed."""
    while True:
        temporary = os.path.join(directory, f".{target}.{secrets.token_hex(6)}.tmp")
        # O_EXCL: never write through someone else's file; mode 0o666 minus the umask.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            return fd, temporary  # a file system without flock: nothing will remove it
        # Between O_EXCL and flock another save may have taken it for a dead one's file
        # and removed it: then start again under a new name.
        if _same_file(fd, temporary):
            return fd, temporary
        os.close(fd)


def _same_file(fd, path):
    try:
        named = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def remove_stale_temporaries(path):
    """Delete the temporary files that killed saves of ``path`` left behind.

    A save holds an exclusive ``flock`` on its temporary file until it has renamed it
    over the target, and the kernel drops the lock when a process dies, however it
    dies: a temporary file of this target that can be locked belongs to no running
    save. Returns the names removed. Files of other targets are never touched.
    """
    directory, target = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = _temporary_pattern(target)
    removed = []
    try:
        names = [e.name for e in os.scandir(directory) if pattern.fullmatch(e.name)]
    except OSError:
        return removed
    for name in names:
        candidate = os.path.join(directory, name)
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, candidate):
                os.unlink(candidate)
                removed.append(name)
        except OSError:  # locked by a save in progress, or no flock here: leave it
            pass
        finally:
            os.close(fd)
    return removed


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


# ------------------------------------------------------------------- reading
def read(path):
    """``(header, arrays)`` from a checkpoint file, every byte verified (see the
    module docstring); CheckpointError if it is not an intact fastdescent
    checkpoint of a version this code knows.

    A missing file raises FileNotFoundError as usual.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            with zipfile.ZipFile(file) as archive:
                return _read_archive(archive, size, path)
    except (CheckpointError, FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # truncated, corrupted (CRC), not a zip, bad JSON...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error


def _read_archive(archive, size, path):
    infos = {}
    for info in archive.infolist():
        if info.filename in infos:
            raise CheckpointError(f"{path}: the member {info.filename!r} appears twice")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{path}: the member {info.filename!r} is compressed; checkpoints are not")
        infos[info.filename] = info
    if sum(info.file_size for info in infos.values()) > size:
        raise CheckpointError(f"{path}: the members declare more bytes than the file holds")
    if HEADER + _NPY not in infos:
        raise CheckpointError(f"{path} is not a fastdescent checkpoint (no header)")
    text = _read_member(archive, infos[HEADER + _NPY], {"dtype": "|u1", "shape": None}, None)
    header = json.loads(bytes(text).decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastdescent checkpoint")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this fastdescent reads up to {VERSION}")
    table = _expected_arrays(header, len(infos), path)
    members = {name[:-len(_NPY)] for name in infos if name.endswith(_NPY)} - {HEADER}
    unknown = sorted(set(infos) - {name + _NPY for name in table} - {HEADER + _NPY})
    if unknown:
        raise CheckpointError(f"{path}: members nothing refers to: {unknown[:5]}")
    missing = sorted(set(table) - members)
    if missing:
        raise CheckpointError(f"{path}: the header refers to missing arrays {missing[:5]}")
    arrays = {}
    for name, declared in table.items():
        info = infos[name + _NPY]
        arrays[name] = _read_member(archive, info, declared, declared.get("sha256"))
    return header, arrays


def _expected_arrays(header, n_members, path):
    """Array name -> what the header declares of it: version 2's table (dtype, shape
    and hash); in version 1, every array a tag or the parameter count refers to,
    with nothing declared."""
    references = _references({k: v for k, v in header.items() if k != "arrays"})
    if not all(isinstance(name, str) for name in references):
        raise CheckpointError(f"{path}: an array reference is not a string")
    if header["version"] == 1:  # the parameters were counted, not tagged
        count = header.get("params", 0)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < n_members:
            raise CheckpointError(f"{path}: 'params' is not a count of the members")
        references += [f"params/{i}" for i in range(count)]
        return dict.fromkeys(references, {})
    table = header.get("arrays")
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: the header has no array table")
    for name, declared in table.items():
        if (not isinstance(declared, dict) or set(declared) != {"dtype", "shape", "sha256"}
                or not isinstance(declared["shape"], list) or not isinstance(declared["sha256"], str)):
            raise CheckpointError(f"{path}: malformed entry for array {name!r}")
    unlisted = sorted(set(references) - set(table))
    if unlisted:
        raise CheckpointError(f"{path}: the header refers to arrays its table does not list: {unlisted[:5]}")
    return table


def _read_member(archive, info, declared, sha256):
    """One ``.npy`` member as an array, checked against ``declared`` (``dtype``,
    ``shape``; None or absent: any), its own size and ``sha256`` (if given), and
    read to the end so that zip checks its CRC-32."""
    name = info.filename
    with archive.open(info) as member:
        preamble, shape, fortran_order, dtype = _npy_header(member, name)
        if dtype.hasobject:
            raise CheckpointError(f"{name} holds Python objects")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(preamble) + nbytes != info.file_size:
            raise CheckpointError(f"{name} declares {info.file_size} bytes; its .npy header implies "
                                  f"{len(preamble) + nbytes}")
        if declared.get("dtype") is not None and json.loads(json.dumps(np.lib.format.dtype_to_descr(dtype))) \
                != declared["dtype"]:
            raise CheckpointError(f"{name} has dtype {dtype}; the header declares {declared['dtype']!r}")
        if declared.get("shape") is not None and (list(shape) != declared["shape"] or fortran_order):
            raise CheckpointError(f"{name} has shape {shape}; the header declares {declared['shape']!r}")
        array = np.empty(shape[::-1] if fortran_order else shape, dtype)
        raw = memoryview(_raw_bytes(array))
        digest = hashlib.sha256()
        done = 0
        while done < nbytes:
            got = member.readinto(raw[done:done + _CHUNK])
            if not got:
                raise CheckpointError(f"{name} ends after {done} of {nbytes} data bytes")
            digest.update(raw[done:done + got])
            done += got
        if member.read(1):
            raise CheckpointError(f"{name} is longer than its .npy header says")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise CheckpointError(f"{name}: the data do not match their SHA-256 (the file is corrupted)")
    return array.T if fortran_order else array


def _npy_header(member, name):
    """``(preamble bytes, shape, fortran_order, dtype)`` of a ``.npy`` stream, read
    with a bounded length and parsed by NumPy's own (literal-only) parser."""
    start = member.read(10)
    if len(start) != 10 or not start.startswith(b"\x93NUMPY"):
        raise CheckpointError(f"{name} is not a .npy array")
    version = (start[6], start[7])
    if version == (1, 0):
        length = int.from_bytes(start[8:10], "little")
    elif version == (2, 0):
        start += member.read(2)
        length = int.from_bytes(start[8:12], "little")
    else:
        raise CheckpointError(f"{name} has .npy format version {version}")
    if length > 100_000:
        raise CheckpointError(f"{name} has a .npy header of {length} bytes")
    preamble = start + member.read(length)
    stream = io.BytesIO(preamble)
    np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream, max_header_size=100_000)
    if stream.tell() != len(preamble) or any(n < 0 for n in shape):
        raise CheckpointError(f"{name} has a malformed .npy header")
    return preamble, shape, fortran_order, dtype
