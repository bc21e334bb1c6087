"""State dicts and checkpoint files of the optimizer objects.

Separate from the step machinery (``base.py``): :class:`Checkpointing` is the part
of :class:`~fastdescent.optim.Optimizer` that exports its state in PyTorch's layout,
validates a state dict or a checkpoint file against the optimizer *before* anything
changes, and loads it.
"""

import copy
import math
import warnings
from collections.abc import Mapping
from numbers import Real

import numpy as np

from .. import _checks, precision
from ..rules._spec import FIRST_GRADIENT
from . import checkpoint
from .lowprec import MASTER, scales_name



def check_registrable(registered, name, obj):
    """Raise TypeError/ValueError unless ``obj`` can be registered as ``name`` beside
    ``registered`` (a non-empty new name, ``state_dict`` and ``load_state_dict``)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"the name must be a non-empty str, got {name!r}")
    if name in registered:
        raise ValueError(f"a state named {name!r} is already registered")
    for method in ("state_dict", "load_state_dict"):
        if not callable(getattr(obj, method, None)):
            raise TypeError(f"{type(obj).__name__} has no {method}() method")

class Checkpointing:
    """Mixin of :class:`~fastdescent.optim.Optimizer`: ``state_dict``,
    ``load_state_dict``, ``save``, ``load`` and ``register_state``."""

    def _state_keys(self, buffers=True):
        """Every key a parameter's state may hold: ``step``, the scalar states and
        (``buffers``) the buffers."""
        keys = (("step",) if self._counts_steps else ()) + self._scalar_state_names
        return keys + self.spec.buffer_names + self._stored_state_keys() if buffers else keys

    def register_state(self, name, obj):
        """Save and restore ``obj`` (anything with ``state_dict()`` and
        ``load_state_dict(sd)``, e.g. a schedule or a weight average) with the
        optimizer: its state goes to ``state_dict()["extra"][name]`` and into
        checkpoint files, so a resumed run continues it exactly."""
        check_registrable(self._registered, name, obj)
        self._registered[name] = obj

    def state_dict(self):
        """PyTorch's layout: ``{"state": {index: {...}}, "param_groups": [{..., "params":
        [indices]}]}`` plus ``"extra"`` if objects are registered and ``"storage"``
        (the storage options, :class:`fastdescent.precision.Storage`) unless they
        are the defaults. Arrays are copies."""
        with self._lock:
            return self._state_dict(copy_arrays=True)

    def _state_dict(self, copy_arrays):
        state = {
            i: {k: v.copy() if copy_arrays and isinstance(v, np.ndarray) else v for k, v in self.state[i].items()}
            for i in sorted(self.state)
        }
        groups = []
        for group, layout in zip(self.param_groups, self._layouts):
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = list(range(layout.first, layout.first + len(layout.params)))
            groups.append(saved)
        sd = {"state": state, "param_groups": groups}
        accumulation = self._accumulation.state_dict(self, copy_arrays)
        if accumulation is not None:  # an open gradient-accumulation window
            sd["accumulation"] = accumulation
        if not self._storage.is_default:
            sd["storage"] = self._storage.as_dict()
        if self._registered:
            sd["extra"] = {name: obj.state_dict() for name, obj in self._registered.items()}
        return sd

    def load_state_dict(self, state_dict, strict=True, convert=False):
        """Load a :meth:`state_dict` (hyperparameters, state, registered objects, an
        open gradient-accumulation window: none if it holds no ``"accumulation"``).

        Everything is validated first (group sizes, every buffer's shape and
        dtype, step counts, hyperparameters, the registered objects' states); on
        any error nothing changes. ``strict``: the registered names must match
        the saved ones exactly (else only the common ones load).

        A state dict saved with other storage options (``state_dict()["storage"]``:
        state dtype, master weights, rounding, seed) loads only with
        ``convert=True``: the state is then decoded and stored as this optimizer
        keeps it (to nearest), a missing master copy starts from the parameters,
        and a :class:`fastdescent.precision.StateConversion` warning says what
        was converted.
        """
        with self._lock:
            self._load(state_dict, strict, None, convert)

    def _load(self, sd, strict, param_values, convert=False):
        saved_storage = self._saved_storage(sd, convert)
        groups, state = self._validated(sd, saved_storage)
        accumulation = self._accumulation.checked(self, sd.get("accumulation"))
        if param_values is not None:
            params = self.params
            if len(param_values) != len(params):
                raise ValueError(f"{len(param_values)} parameter arrays for {len(params)} parameters")
            for i, (p, value) in enumerate(zip(params, param_values)):
                _check_like(value, p, f"parameter {i}")
        self._load_extras(sd.get("extra"), strict)
        for group, layout, hyper in zip(self.param_groups, self._layouts, groups):
            group.update(hyper)
            layout.config = None  # validate again at the next step
        if param_values is not None:  # first: a master copy that is not saved starts from them
            for p, value in zip(self.params, param_values):
                np.copyto(p, value)
        conversions = self._replace_state(state, saved_storage)
        self._accumulation.load(self, accumulation)
        if conversions:
            warnings.warn("loaded state converted: " + "; ".join(conversions), precision.StateConversion,
                          stacklevel=3)

    def _saved_storage(self, sd, convert):
        """The storage options ``sd`` was saved with; ValueError if they differ from
        this optimizer's and ``convert`` is false."""
        saved = sd.get("storage") if isinstance(sd, Mapping) else None
        if saved is None:
            saved_storage = precision.Storage()
        else:
            if not isinstance(saved, Mapping) or set(saved) - {"state_dtype", "rounding", "seed", "master_weights"}:
                raise ValueError(f"the state dict's 'storage' is malformed: {saved!r}")
            saved_storage = precision.Storage.of(**saved)
        if saved_storage != self._storage and not convert:
            differ = {k: (v, self._storage.as_dict()[k]) for k, v in saved_storage.as_dict().items()
                      if self._storage.as_dict()[k] != v}
            text = ", ".join(f"{k}={a!r} (here {b!r})" for k, (a, b) in differ.items())
            raise ValueError(f"the state dict was saved with {text}: load it with convert=True to convert it")
        return saved_storage

    def _validated(self, sd, saved_storage):
        """The hyperparameters per group and the state per index that ``sd`` holds
        (saved with ``saved_storage``), checked against this optimizer; raises
        before anything changes."""
        if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
            raise ValueError("a state dict needs 'state' and 'param_groups'")
        saved_groups = sd["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            n = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else "no list of"
            raise ValueError(f"the state dict has {n} parameter groups; this optimizer has {len(self.param_groups)}")
        index_of_saved, groups = {}, []
        for g, (saved, layout) in enumerate(zip(saved_groups, self._layouts)):
            ids = saved.get("params") if isinstance(saved, Mapping) else None
            if not isinstance(ids, (list, tuple)) or len(ids) != len(layout.params):
                raise ValueError(f"saved param_groups[{g}] does not list {len(layout.params)} parameters like this group")
            for k, saved_id in enumerate(ids):
                if saved_id in index_of_saved:
                    raise ValueError(f"parameter {saved_id!r} appears twice in the saved groups")
                index_of_saved[saved_id] = layout.first + k
            groups.append({k: v for k, v in saved.items() if k != "params"})
        saved_state = sd["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError("the state dict's 'state' must be a dict")
        state = {}
        for saved_id, entry in saved_state.items():
            if saved_id not in index_of_saved:
                raise ValueError(f"the state dict has state for parameter {saved_id!r}, which no group lists")
            state[index_of_saved[saved_id]] = self._checked_entry(entry, index_of_saved[saved_id], saved_id,
                                                                  saved_storage)
        for g in range(len(self._layouts)):
            hyper = self.spec.validate(groups[g], f"saved param_groups[{g}]")
            self._check_storage(g, hyper, {b.dtype for b in self._layouts[g].buckets})
            self._checked_group_state(g, hyper, state, saved_storage)
        return groups, state

    def _checked_entry(self, entry, index, saved_id, saved_storage):
        if not isinstance(entry, Mapping):
            raise TypeError(f"state[{saved_id!r}] must be a dict, got {type(entry).__name__}")
        param = self._param_at(index)
        scales = {scales_name(b.name): b for b in self.spec.buffers}
        buffers = {b.name: b for b in self.spec.buffers}
        checked = {}
        for name, value in entry.items():
            where = f"state[{saved_id!r}][{name!r}]"
            if name == "step" and (self.spec.counts_steps or saved_storage.stochastic):
                checked["step"] = _step_count(value, f"state[{saved_id!r}]['step']")
            elif name in self._scalar_state_names:
                checked[name] = _checks.finite(where, _scalar(value))
            elif name in buffers:
                if value is not None:  # PyTorch keeps momentum_buffer=None when unused
                    kind = saved_storage.buffer_kind(buffers[name], param.dtype)
                    _check_like(value, param, where, buffers[name], dtype=_stored_dtype(kind, param.dtype))
                    checked[name] = value
            elif name in scales and saved_storage.buffer_kind(scales[name], param.dtype) in (precision.INT8,
                                                                                              precision.UINT8):
                _check_scales(value, param, where)
                checked[name] = value
            elif name == MASTER and saved_storage.master_weights:
                _check_like(value, param, where, dtype=np.dtype(np.float32))
                checked[name] = value
            else:
                known = self._state_keys()
                raise ValueError(
                    f"state[{saved_id!r}] has an entry {name!r}; a {type(self).__name__} keeps only {known}"
                )
        return checked

    def _checked_group_state(self, g, hyper, state, saved_storage):
        """Check that group ``g``'s saved state is whole, uniform and holds what the
        validated hyperparameters ``hyper`` need (as kept with ``saved_storage``)."""
        layout = self._layouts[g]
        entries = [state.get(i) for i in range(layout.first, layout.first + len(layout.params))]
        present = [e for e in entries if e]
        if not present:
            return
        if len(present) != len(entries):
            raise ValueError(f"in group {g} some parameters have state and others none")
        # Every parameter holds the same entries, but the buffers its shape keeps none of.
        names = set().union(*present)
        params = layout.params
        if any(set(e) != {n for n in names if self._keeps(n, p)} for e, p in zip(entries, params)):
            raise ValueError(f"the parameters of group {g} hold different state entries")
        counted = ("step",) if self.spec.counts_steps or saved_storage.stochastic else ()
        expected = counted + self._scalar_state_names
        missing_keys = [k for k in expected if k not in names]
        if missing_keys:
            raise ValueError(f"the state of group {g} lacks {missing_keys}")
        for key in expected:  # one kernel call steps the whole group
            values = {e[key] for e in present}
            if len(values) != 1:
                raise ValueError(f"the parameters of group {g} hold different {key!r}: {sorted(values)}")
        wanted = self._wanted(hyper)
        missing = [n for n, fill in wanted.items() if n not in names and fill is not FIRST_GRADIENT
                   and any(self._keeps(n, p) for p in params)]
        for name in [n for n in wanted if n in names]:
            buffer = self._buffer_specs[name]
            if any(saved_storage.buffer_kind(buffer, p.dtype) in (precision.INT8, precision.UINT8) for p in params):
                missing += [scales_name(name)] if scales_name(name) not in names else []
        if saved_storage.master_weights and MASTER not in names:
            missing.append(MASTER)
        if missing:
            raise ValueError(f"the state of group {g} lacks {missing}, which its hyperparameters need")

    def _keeps(self, name, param):
        """True if ``param`` keeps state entry ``name`` when its rule needs it (a
        scalar, or a buffer its shape keeps)."""
        buffer = self._buffer_specs.get(name)
        return buffer is None or buffer.shape is None or buffer.shape_for(param.shape) is not None

    def _param_at(self, index):
        for layout in reversed(self._layouts):
            if index >= layout.first:
                return layout.params[index - layout.first]
        raise IndexError(index)

    def _load_extras(self, extra, strict):
        """Load the registered objects' states; on an error restore those already loaded."""
        extra = {} if extra is None else extra
        if not isinstance(extra, Mapping):
            raise TypeError("the state dict's 'extra' must be a dict")
        if strict and set(extra) != set(self._registered):
            raise ValueError(
                f"the state dict holds state for {sorted(extra)} but {sorted(self._registered)} are "
                "registered; register_state() the same objects first (or load with strict=False)"
            )
        names = [name for name in self._registered if name in extra]
        backups = {name: copy.deepcopy(self._registered[name].state_dict()) for name in names}
        loaded = []
        try:
            for name in names:
                loaded.append(name)  # before: a failing load_state_dict may have changed part of its object
                self._registered[name].load_state_dict(extra[name])
        except BaseException:
            for name in loaded:
                self._registered[name].load_state_dict(backups[name])
            raise

    def _replace_state(self, state, saved_storage):
        """Replace every group's state by the validated ``state`` (kept as
        ``saved_storage`` keeps it); returns what was converted, as text."""
        conversions = []
        for g, layout in enumerate(self._layouts):
            indices = range(layout.first, layout.first + len(layout.params))
            for i in indices:
                self.state.pop(i, None)
            layout.states = None
            for bucket in layout.buckets:
                bucket.buffers.clear()
                for role in [r for r in bucket.arenas if r not in ("param", "grad")]:
                    del bucket.arenas[role]
                if bucket.stored is not None:
                    bucket.stored.scales.clear()
            if not any(state.get(i) for i in indices):
                continue
            first = state[layout.first]
            scalars = [k for k in self._state_keys(buffers=False) if k in first]
            layout.states = [{k: state[i][k] for k in scalars} for i in indices]
            if self._counts_steps and "step" not in first:
                conversions.append(f"group {g}: no saved step count, stochastic rounding counts from 0")
                for own in layout.states:
                    own["step"] = 0
            self.state.update(zip(indices, layout.states))
            if self._storage.master_weights:
                self._allocate_masters(g)
                if saved_storage.master_weights:
                    for i, own in zip(indices, layout.states):
                        np.copyto(own[MASTER], state[i][MASTER])
                else:
                    conversions.append(f"group {g}: master copies made from the bfloat16/float16 parameters")
            elif saved_storage.master_weights:
                conversions.append(f"group {g}: the saved float32 master copies were dropped")
            saved = set().union(*(state[i] for i in indices))
            for name in [n for n in self.spec.buffer_names if n in saved]:
                self._allocate_buffer(g, name, FIRST_GRADIENT)
                buffer = self._buffer_specs[name]
                changed = set()
                for i, own in zip(indices, layout.states):
                    if name not in own:  # a buffer this parameter's shape keeps none of
                        continue
                    param = self._param_at(i)
                    saved_kind = saved_storage.buffer_kind(buffer, param.dtype)
                    kind = self._storage.buffer_kind(buffer, param.dtype)
                    if saved_kind == kind:
                        np.copyto(own[name], state[i][name])
                        if scales_name(name) in own:
                            np.copyto(own[scales_name(name)], state[i][scales_name(name)])
                        continue
                    values = precision.decoded(saved_kind, state[i][name], state[i].get(scales_name(name)))
                    stored, scales = self._storage.new_buffer(kind, own[name].shape, 0.0)
                    if kind == precision.NATIVE:
                        stored = values
                    elif kind == precision.BF16:
                        stored = values.astype(stored.dtype)
                    else:
                        stored, scales = precision.int8_encode(values, precision.code_of(kind))
                    np.copyto(own[name], stored.reshape(own[name].shape), casting="unsafe")
                    if scales is not None:
                        np.copyto(own[scales_name(name)], scales)
                    changed.add((precision.KIND_NAMES[saved_kind], precision.KIND_NAMES[kind]))
                conversions += [f"group {g}: {name!r} {a} -> {b}" for a, b in sorted(changed)]
        if saved_storage.rounding != self._storage.rounding or saved_storage.seed != self._storage.seed:
            conversions.append(f"rounding {saved_storage.rounding!r} (seed {saved_storage.seed}) -> "
                               f"{self._storage.rounding!r} (seed {self._storage.seed}) from now on")
        self._state_changed()
        return conversions

    # ----------------------------------------------------------- checkpoints
    def save(self, path, *, params=True):
        """Write a checkpoint: the state dict, registered objects and (``params``)
        the parameter values, to one ``.npz`` file, atomically (a failed save
        leaves any existing file untouched). No pickle."""
        with self._lock:
            checkpoint.save(path, type(self).__name__, self._state_dict(copy_arrays=False),
                            self.params if params else None)

    def load(self, path, *, params=True, strict=True, convert=False):
        """Restore a checkpoint written by :meth:`save` of the same optimizer class
        (and, with ``params``, the parameter values it holds). Validates it all
        first; raises :class:`CheckpointError` and changes nothing if the file is
        unreadable, corrupted or does not fit. ``convert``: as in
        :meth:`load_state_dict` (other storage options)."""
        with self._lock:
            self._load_file(path, params, strict, convert)

    def _load_file(self, path, params, strict, convert):
        sd, values = checkpoint.load(path, type(self).__name__)
        try:
            self._load(sd, strict, values if params else None, convert)
        except checkpoint.CheckpointError:
            raise
        except (LookupError, AttributeError, TypeError, ValueError) as error:  # from registered objects too
            raise checkpoint.CheckpointError(f"{path} does not fit this optimizer: {error!r}") from error


def _scalar(value):
    """A 0-d array (or tensor-like with ``item``) as its Python scalar."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def _stored_dtype(kind, param_dtype):
    """The dtype a state buffer of ``kind`` has, next to a parameter of ``param_dtype``."""
    if kind == precision.NATIVE:
        return np.dtype(np.float64 if np.dtype(param_dtype) == np.float64 else np.float32)
    if kind == precision.BF16:
        return precision.bfloat16_dtype()
    return precision.code_of(kind).dtype


def _check_like(value, param, where, buffer=None, dtype=None):
    """``value`` suits ``param``: an array of ``dtype`` (default: the parameter's)
    and of its shape, or of the shape ``buffer`` (a
    :class:`~fastdescent.rules._spec.Buffer`) has for it."""
    dtype = param.dtype if dtype is None else dtype
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{where} has dtype {value.dtype}; expected {dtype} (parameter {param.dtype})")
    shape = param.shape if buffer is None else buffer.shape_for(param.shape)
    if shape is None:
        raise ValueError(f"{where} is given, but a parameter of shape {param.shape} keeps none")
    if value.shape != shape:
        expected = "the parameter has" if shape == param.shape else f"a parameter of shape {param.shape} keeps"
        raise ValueError(f"{where} has shape {value.shape}; {expected} {shape}")


def _check_scales(value, param, where):
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(value).__name__}")
    expected = (precision.n_blocks(param.size),)
    if value.dtype != np.float32 or value.shape != expected:
        raise ValueError(f"{where} must be float32 of shape {expected} (one scale per block of "
                         f"{precision.BLOCK}), got {value.dtype} {value.shape}")
    if not np.all(value >= 0):
        raise ValueError(f"{where}: block scales are non-negative")


def _step_count(value, where):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    # The next step must still be a valid step number (_checks.MAX_STEP).
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, Real) or not 0 <= value < _checks.MAX_STEP - 1
            or value != math.floor(value)):
        raise ValueError(f"{where} must be an integer in [0, 2**63 - 1), got {value!r}")
    return int(value)
