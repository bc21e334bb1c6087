"""Sharded checkpoints, and the state a sharded optimizer loads from (no MPI here).

A sharded checkpoint is a directory:

* ``<id>-rank<r>-of<N>.npz``, one per rank, written by that rank: for every bucket
  ``k`` (a group's parameters of one dtype, see ``_layout``) the rank's elements of
  the parameters (``b<k>/param``) and of each state buffer (``b<k>/<name>``), flat;
* ``index.npz``, written last by rank 0: the optimizer class, every group's
  parameter shapes and dtypes, hyperparameters, scalar state (the step...) and state buffer names, each
  bucket's split among the ranks, the registered objects' states (schedules,
  weight averages) and the names of the rank files.

Every file is a fastdescent checkpoint file (``fastdescent.optim.checkpoint``:
an ``.npz`` with a JSON header, CRC-checked, written atomically, no pickle). The
``<id>`` is new for every save and written into each file: the index names the
files of its own save, so a save that dies half way leaves the previous
checkpoint whole (its index still names its own files); rank 0 deletes the
previous save's files only after the new index is in place.

Any number of ranks reads it back, each reading only the files that overlap its
shard, and so does one process without MPI (:func:`load_checkpoint`). The
sources below turn either kind of checkpoint (and an in-memory state dict) into
flat element ranges of each bucket, which is all a sharded optimizer needs.
"""

import os
import re
from collections.abc import Mapping

import numpy as np

from ..optim import checkpoint as files
from ..optim.checkpoint import CheckpointError
from ._layout import buckets_of

INDEX = "index.npz"
SHARDED_VERSION = 1
_RANK_FILE = re.compile(r"^[0-9a-f]+-rank\d+-of\d+\.npz$")


def rank_file_name(save_id, rank, world_size):
    return f"{save_id}-rank{rank}-of{world_size}.npz"


def is_sharded(path):
    """True if ``path`` is a directory holding a sharded checkpoint's index."""
    return os.path.isfile(os.path.join(os.fspath(path), INDEX))


def _plain(value):
    """A scalar state entry as a Python value (saved steps may be NumPy or torch scalars)."""
    return value.item() if hasattr(value, "item") else value


def group_signature(params):
    """``[(shape, dtype), ...]`` of one group's parameter arrays."""
    return [(tuple(p.shape), np.dtype(p.dtype)) for p in params]


class StateSource:
    """What a load puts into an optimizer, whatever it comes from.

    Attributes
    ----------
    hyper : list of dict
        Each group's hyperparameters (no ``"params"``).
    group_state : list
        Per group: None (no state yet) or ``(scalars, names)``: the scalar state
        entries every parameter of the group shares (``{"step": t}``, and any
        per-parameter scalar a rule keeps) and the state buffers' names.
    extra : dict or None
        The registered objects' states.
    has_params : bool
        Whether parameter values are stored (read them with name ``"param"``).
    """

    hyper = group_state = extra = None
    has_params = False

    def read(self, k, name, start, stop):
        """Elements ``[start, stop)`` of bucket ``k``'s flat ``name`` (a state buffer or "param")."""
        raise NotImplementedError


def _check_groups(saved, mine, what):
    """Raise CheckpointError unless ``saved`` (per group, ``[(shape, dtype)]``) equals ``mine``."""
    if len(saved) != len(mine):
        raise CheckpointError(f"{what} has {len(saved)} parameter groups; this optimizer has {len(mine)}")
    for g, (theirs, ours) in enumerate(zip(saved, mine)):
        if len(theirs) != len(ours):
            raise CheckpointError(f"{what}: group {g} has {len(theirs)} parameters; this optimizer's has {len(ours)}")
        for k, ((shape, dtype), (my_shape, my_dtype)) in enumerate(zip(theirs, ours)):
            if np.dtype(dtype) != my_dtype or tuple(shape) != my_shape:
                raise CheckpointError(
                    f"{what}: group {g} parameter {k} is {np.dtype(dtype)}{tuple(shape)}; "
                    f"this optimizer's is {my_dtype}{my_shape}"
                )


class FullStateSource(StateSource):
    """A single-process state dict (PyTorch's layout, one entry per parameter), and
    optionally the parameter values, checked against the groups ``signature``
    (per group ``[(shape, dtype)]``). Raises ValueError or TypeError on anything
    that does not fit; hyperparameter values and buffer names are left to the
    optimizer's own ``load_state_dict``."""

    def __init__(self, state_dict, signature, params=None):
        sd = state_dict
        if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
            raise ValueError("a state dict needs 'state' and 'param_groups'")
        groups, state = sd["param_groups"], sd["state"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(signature):
            n = len(groups) if isinstance(groups, (list, tuple)) else "no list of"
            raise ValueError(f"the state dict has {n} parameter groups; this optimizer has {len(signature)}")
        if not isinstance(state, Mapping):
            raise TypeError("the state dict's 'state' must be a dict")
        self.hyper, self.group_state, self._entries, listed = [], [], [], set()
        for g, (saved, params_of_group) in enumerate(zip(groups, signature)):
            ids = saved.get("params") if isinstance(saved, Mapping) else None
            if not isinstance(ids, (list, tuple)) or len(ids) != len(params_of_group):
                raise ValueError(f"saved param_groups[{g}] does not list {len(params_of_group)} parameters like this group")
            if listed & set(ids) or len(set(ids)) != len(ids):
                raise ValueError(f"saved param_groups[{g}] lists a parameter twice")
            listed |= set(ids)
            entries = [state.get(i) for i in ids]
            for i, entry, (shape, dtype) in zip(ids, entries, params_of_group):
                if entry is not None and not isinstance(entry, Mapping):
                    raise TypeError(f"state[{i!r}] must be a dict, got {type(entry).__name__}")
                for name, value in (entry or {}).items():
                    if is_buffer(value):  # scalars (the step...) are the rule's to check
                        _check_array(value, shape, dtype, f"state[{i!r}][{name!r}]")
            self.hyper.append({k: v for k, v in saved.items() if k != "params"})
            self.group_state.append(_uniform_state(g, entries))
            self._entries.append(entries)
        extra_ids = set(state) - listed
        if extra_ids:
            raise ValueError(f"the state dict has state for parameter {sorted(extra_ids, key=repr)[0]!r}, which no group lists")
        self.extra = sd.get("extra")
        self.has_params = params is not None
        self._params = None
        if params is not None:
            flat_signature = [ps for group in signature for ps in group]
            if len(params) != len(flat_signature):
                raise ValueError(f"{len(params)} parameter arrays for {len(flat_signature)} parameters")
            for i, (p, (shape, dtype)) in enumerate(zip(params, flat_signature)):
                _check_array(p, shape, dtype, f"parameter {i}")
            starts = np.cumsum([0] + [len(group) for group in signature])
            self._params = [list(params[a:b]) for a, b in zip(starts, starts[1:])]
        self._buckets = buckets_of(signature, 1)

    def read(self, k, name, start, stop):
        bucket = self._buckets[k]
        if name == "param":
            arrays = [self._params[bucket.group][i] for i in bucket.positions]
        else:
            arrays = [self._entries[bucket.group][i][name] for i in bucket.positions]
        out = np.empty(stop - start, dtype=bucket.dtype)
        offset = 0
        for j, a, b in bucket.pieces(start, stop):
            out[offset:offset + b - a] = np.ravel(arrays[j])[a:b]
            offset += b - a
        return out


def _check_array(value, shape, dtype, where):
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{where} has dtype {value.dtype}; the parameter has {dtype}")
    if value.shape != tuple(shape):
        raise ValueError(f"{where} has shape {value.shape}; the parameter has {tuple(shape)}")


def is_buffer(value):
    return isinstance(value, np.ndarray) and value.ndim > 0


def _uniform_state(g, entries):
    """``(scalars, names)`` of a group whose parameters hold the same state, or None
    if none holds any; ValueError if they differ. A flat shard spans parameters, so
    their scalar state (the step...) must be one value per group."""
    present = [{k: v for k, v in (e or {}).items() if v is not None} for e in entries]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"in group {g} some parameters have state and others none")
    names = set(present[0])
    if any(set(e) != names for e in present):
        raise ValueError(f"the parameters of group {g} hold different state entries")
    scalars = {}
    for name in sorted(n for n in names if not is_buffer(present[0][n])):
        values = {_plain(e[name]) for e in present}
        if len(values) != 1:
            raise ValueError(f"the parameters of group {g} hold different {name!r}: {sorted(values)}")
        scalars[name] = values.pop()
    return scalars, tuple(sorted(n for n in names if n not in scalars))


class ShardedSource(StateSource):
    """A sharded checkpoint directory, checked against an optimizer.

    The index is read and checked at construction (the class name, every group's
    parameters, the buckets' split); :meth:`read` opens only the rank files that
    overlap the range asked for, checks that each belongs to this save and holds
    what the index says, and keeps them for later reads.
    """

    def __init__(self, path, optimizer_name, signature):
        self.path = os.fspath(path)
        header, arrays = files.read(os.path.join(self.path, INDEX))
        info = header.get("sharded")
        if not isinstance(info, Mapping) or info.get("version") != SHARDED_VERSION:
            raise CheckpointError(f"{self.path}/{INDEX} is not the index of a sharded checkpoint this version reads")
        try:
            self.save_id = str(info["save_id"])
            self.world_size = int(info["world_size"])
            self.files = [str(f) for f in info["files"]]
            kind = header["optimizer"]
            saved_groups = [[(tuple(s), np.dtype(d)) for s, d in zip(g["shapes"], g["dtypes"])]
                            for g in header["groups"]]
            self.hyper = files.decode(header["param_groups"], arrays)
            self.group_state = [None if s is None else (files.decode(s["scalars"], arrays), tuple(s["names"]))
                                for s in header["group_state"]]
            saved_buckets = header["buckets"]
            self.has_params = bool(header["params"])
            self.extra = files.decode(header["extra"], arrays) if "extra" in header else None
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{self.path}: malformed sharded checkpoint index ({error!r})") from error
        if kind != optimizer_name:
            raise CheckpointError(f"{self.path} holds a {kind} optimizer, not a {optimizer_name}")
        _check_groups(saved_groups, signature, self.path)
        if len(self.files) != self.world_size or any(not _RANK_FILE.match(f) for f in self.files):
            raise CheckpointError(f"{self.path}: the index does not name {self.world_size} rank files")
        if len(self.hyper) != len(signature) or len(self.group_state) != len(signature):
            raise CheckpointError(f"{self.path}: the index does not describe {len(signature)} groups")
        self._buckets = buckets_of(signature, self.world_size)
        self._ranges = self._checked_ranges(saved_buckets)
        self._open = {}

    def _checked_ranges(self, saved):
        if not isinstance(saved, list) or len(saved) != len(self._buckets):
            raise CheckpointError(f"{self.path}: the index lists {len(saved)} buckets, expected {len(self._buckets)}")
        ranges = []
        for k, (entry, bucket) in enumerate(zip(saved, self._buckets)):
            try:
                spans = [(int(a), int(b)) for a, b in entry["ranges"]]
                same = entry["group"] == bucket.group and np.dtype(entry["dtype"]) == bucket.dtype
            except (KeyError, TypeError, ValueError) as error:
                raise CheckpointError(f"{self.path}: malformed bucket {k} in the index ({error!r})") from error
            ends = [0] + [b for _, b in spans]
            if not same or len(spans) != self.world_size or [a for a, _ in spans] != ends[:-1] \
                    or any(b < a for a, b in spans) or ends[-1] != bucket.size:
                raise CheckpointError(f"{self.path}: bucket {k} in the index does not split this optimizer's "
                                      f"group {bucket.group} ({bucket.dtype}, {bucket.size} elements)")
            ranges.append(spans)
        return ranges

    def _rank_arrays(self, rank):
        if rank not in self._open:
            path = os.path.join(self.path, self.files[rank])
            try:
                header, arrays = files.read(path)
            except FileNotFoundError:
                raise CheckpointError(f"{path} is missing: the index names a file for each of the "
                                      f"{self.world_size} ranks that saved it") from None
            info = header.get("shard")
            if not isinstance(info, Mapping) or info.get("save_id") != self.save_id or info.get("rank") != rank \
                    or info.get("world_size") != self.world_size:
                raise CheckpointError(f"{path} is not rank {rank}'s file of save {self.save_id} (found {info!r})")
            self._open[rank] = arrays
        return self._open[rank]

    def read(self, k, name, start, stop):
        bucket = self._buckets[k]
        out = np.empty(stop - start, dtype=bucket.dtype)
        for rank, (a, b) in enumerate(self._ranges[k]):
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            key = f"b{k}/{name}"
            stored = self._rank_arrays(rank).get(key)
            if stored is None or stored.dtype != bucket.dtype or stored.shape != (b - a,):
                raise CheckpointError(f"{self.path}/{self.files[rank]}: {key} is missing or is not "
                                      f"{b - a} {bucket.dtype} elements")
            out[lo - start:hi - start] = stored[lo - a:hi - a]
        return out

    def read_all(self, names_of_group):
        """Check every rank file at once (each holds every array the index promises)."""
        for k, bucket in enumerate(self._buckets):
            for name in names_of_group(bucket.group):
                self.read(k, name, 0, bucket.size)


def write_rank_file(directory, save_id, rank, world_size, arrays):
    """Rank ``rank``'s file of save ``save_id``: ``arrays`` maps ``b<k>/<name>`` to flat elements."""
    header = {"shard": {"save_id": save_id, "rank": rank, "world_size": world_size}}
    files.write(os.path.join(directory, rank_file_name(save_id, rank, world_size)), header, arrays)


def write_index(directory, *, save_id, world_size, optimizer_name, signature, hyper, group_state, buckets,
                has_params, extra):
    """The index of save ``save_id`` (written after every rank file is in place)."""
    arrays = {}
    header = {
        "sharded": {"version": SHARDED_VERSION, "save_id": save_id, "world_size": world_size,
                    "files": [rank_file_name(save_id, r, world_size) for r in range(world_size)]},
        "optimizer": optimizer_name,
        "groups": [{"shapes": [list(s) for s, _ in group], "dtypes": [d.name for _, d in group]} for group in signature],
        "param_groups": files.encode(hyper, arrays),
        "group_state": [None if s is None else {"scalars": files.encode(s[0], arrays), "names": list(s[1])}
                        for s in group_state],
        "buckets": [{"group": b.group, "dtype": b.dtype.name, "ranges": [list(r) for r in b.ranges()]}
                    for b in buckets],
        "params": bool(has_params),
    }
    if extra is not None:
        header["extra"] = files.encode(extra, arrays)
    files.write(os.path.join(directory, INDEX), header, arrays)


def remove_stale_rank_files(directory, save_id):
    """Delete rank files of earlier saves (best effort)."""
    for name in os.listdir(directory):
        if _RANK_FILE.match(name) and not name.startswith(f"{save_id}-"):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def load_checkpoint(optimizer, path, *, params=True, strict=True):
    """Load a sharded checkpoint (a directory written by ``ShardedOptimizer.save(...,
    sharded=True)`` on any number of ranks) into a plain, single-process fastdescent
    optimizer built over the same parameter groups; or a consolidated checkpoint
    file (``opt.load(path)``). No MPI is needed.

    Everything (the index, every rank file, every shape and hyperparameter) is
    checked before anything changes; raises :class:`fastdescent.CheckpointError`
    if it does not fit.
    """
    if not is_sharded(path):
        optimizer.load(path, params=params, strict=strict)
        return
    signature = [group_signature(group["params"]) for group in optimizer.param_groups]
    source = ShardedSource(path, type(optimizer).__name__, signature)
    try:
        sd, values = full_state_dict(source, signature, params=params)
        _check_values(values, optimizer)
        optimizer.load_state_dict(sd, strict=strict)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} does not fit this optimizer: {error}") from error
    for p, value in zip(optimizer.params, values or ()):
        np.copyto(p, value)


def _check_values(values, optimizer):
    for i, (p, value) in enumerate(zip(optimizer.params, values or ())):
        if p.shape != value.shape or p.dtype != value.dtype:
            raise CheckpointError(f"parameter {i} is {value.dtype}{value.shape} in the checkpoint, {p.dtype}{p.shape} here")


def full_state_dict(source, signature, *, params=True):
    """``(state_dict, param_values)`` of a single-process optimizer from ``source``
    (param_values None unless ``params`` and the source holds them)."""
    buckets = buckets_of(signature, 1)
    flats = {}
    for k, bucket in enumerate(buckets):
        state = source.group_state[bucket.group]
        names = list(state[1]) if state else []
        if params and source.has_params:
            names.append("param")
        for name in names:
            flats[k, name] = bucket.views(source.read(k, name, 0, bucket.size))
    state, groups, values, first = {}, [], [], 0
    for g, group in enumerate(signature):
        groups.append({**source.hyper[g], "params": list(range(first, first + len(group)))})
        first += len(group)
    per_param = [[None] * len(group) for group in signature]
    for (k, name), views in flats.items():
        bucket = buckets[k]
        for position, view in zip(bucket.positions, views):
            if per_param[bucket.group][position] is None:
                per_param[bucket.group][position] = {}
            per_param[bucket.group][position][name] = view
    index = 0
    for g, group in enumerate(signature):
        for k in range(len(group)):
            entry = per_param[g][k] or {}
            if "param" in entry:
                values.append(entry.pop("param"))
            group_state = source.group_state[g]
            if group_state is not None:
                state[index] = dict(group_state[0]) | entry
            index += 1
    sd = {"state": state, "param_groups": groups}
    if source.extra is not None:
        sd["extra"] = source.extra
    return sd, (values if params and source.has_params else None)



def make_directory(path):
    """Create the directory of a sharded checkpoint (or reuse it)."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} exists and is not a directory; a sharded checkpoint is a directory")
    os.makedirs(path, exist_ok=True)
