"""State dicts and checkpoint files of the optimizer objects.

Separate from the step machinery (``base.py``): :class:`Checkpointing` is the part
of :class:`~fastdescent.optim.Optimizer` that exports its state in PyTorch's layout,
validates a state dict or a checkpoint file against the optimizer *before* anything
changes, and loads it.
"""

import copy
import math
from collections.abc import Mapping
from numbers import Real

import numpy as np

from .. import _checks
from ..rules._spec import FIRST_GRADIENT
from . import checkpoint


class Checkpointing:
    """Mixin of :class:`~fastdescent.optim.Optimizer`: ``state_dict``,
    ``load_state_dict``, ``save``, ``load`` and ``register_state``."""

    def _state_keys(self, buffers=True):
        """Every key a parameter's state may hold: ``step``, the scalar states and
        (``buffers``) the buffers."""
        keys = (("step",) if self.spec.counts_steps else ()) + self._scalar_state_names
        return keys + self.spec.buffer_names if buffers else keys

    def register_state(self, name, obj):
        """Save and restore ``obj`` (anything with ``state_dict()`` and
        ``load_state_dict(sd)``, e.g. a schedule or a weight average) with the
        optimizer: its state goes to ``state_dict()["extra"][name]`` and into
        checkpoint files, so a resumed run continues it exactly."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"the name must be a non-empty str, got {name!r}")
        if name in self._registered:
            raise ValueError(f"a state named {name!r} is already registered")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(obj, method, None)):
                raise TypeError(f"{type(obj).__name__} has no {method}() method")
        self._registered[name] = obj

    def state_dict(self):
        """PyTorch's layout: ``{"state": {index: {...}}, "param_groups": [{..., "params":
        [indices]}]}`` plus ``"extra"`` if objects are registered. Arrays are copies."""
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
        if self._registered:
            sd["extra"] = {name: obj.state_dict() for name, obj in self._registered.items()}
        return sd

    def load_state_dict(self, state_dict, strict=True):
        """Load a :meth:`state_dict` (hyperparameters, state, registered objects, an
        open gradient-accumulation window: none if it holds no ``"accumulation"``).

        Everything is validated first (group sizes, every buffer's shape and
        dtype, step counts, hyperparameters, the registered objects' states); on
        any error nothing changes. ``strict``: the registered names must match
        the saved ones exactly (else only the common ones load).
        """
        with self._lock:
            self._load(state_dict, strict, None)

    def _load(self, sd, strict, param_values):
        groups, state = self._validated(sd)
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
        self._replace_state(state)
        self._accumulation.load(self, accumulation)
        if param_values is not None:
            for p, value in zip(self.params, param_values):
                np.copyto(p, value)

    def _validated(self, sd):
        """The hyperparameters per group and the state per index that ``sd`` holds,
        checked against this optimizer; raises before anything changes."""
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
            state[index_of_saved[saved_id]] = self._checked_entry(entry, index_of_saved[saved_id], saved_id)
        for g in range(len(self._layouts)):
            hyper = self.spec.validate(groups[g], f"saved param_groups[{g}]")
            self._checked_group_state(g, hyper, state)
        return groups, state

    def _checked_entry(self, entry, index, saved_id):
        if not isinstance(entry, Mapping):
            raise TypeError(f"state[{saved_id!r}] must be a dict, got {type(entry).__name__}")
        param = self._param_at(index)
        checked = {}
        for name, value in entry.items():
            if name == "step" and self.spec.counts_steps:
                checked["step"] = _step_count(value, f"state[{saved_id!r}]['step']")
            elif name in self._scalar_state_names:
                checked[name] = _checks.finite(f"state[{saved_id!r}][{name!r}]", _scalar(value))
            elif name in self.spec.buffer_names:
                if value is not None:  # PyTorch keeps momentum_buffer=None when unused
                    _check_like(value, param, f"state[{saved_id!r}][{name!r}]", self._buffer_specs[name])
                    checked[name] = value
            else:
                known = self._state_keys()
                raise ValueError(
                    f"state[{saved_id!r}] has an entry {name!r}; a {type(self).__name__} keeps only {known}"
                )
        return checked

    def _checked_group_state(self, g, hyper, state):
        """Check that group ``g``'s saved state is whole, uniform and holds what the
        validated hyperparameters ``hyper`` need."""
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
        missing_keys = [k for k in self._state_keys(buffers=False) if k not in names]
        if missing_keys:
            raise ValueError(f"the state of group {g} lacks {missing_keys}")
        for key in self._state_keys(buffers=False):  # one kernel call steps the whole group
            values = {e[key] for e in present}
            if len(values) != 1:
                raise ValueError(f"the parameters of group {g} hold different {key!r}: {sorted(values)}")
        wanted = self._wanted(hyper)
        missing = [n for n, fill in wanted.items() if n not in names and fill is not FIRST_GRADIENT
                   and any(self._keeps(n, p) for p in params)]
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

    def _replace_state(self, state):
        for g, layout in enumerate(self._layouts):
            indices = range(layout.first, layout.first + len(layout.params))
            for i in indices:
                self.state.pop(i, None)
            layout.states = None
            for bucket in layout.buckets:
                bucket.buffers.clear()
                for role in [r for r in bucket.arenas if r not in ("param", "grad")]:
                    del bucket.arenas[role]
            if not any(state.get(i) for i in indices):
                continue
            first = state[layout.first]
            scalars = [k for k in self._state_keys(buffers=False) if k in first]
            layout.states = [{k: state[i][k] for k in scalars} for i in indices]
            self.state.update(zip(indices, layout.states))
            saved = set().union(*(state[i] for i in indices))
            for name in [n for n in self.spec.buffer_names if n in saved]:
                self._allocate_buffer(g, name, FIRST_GRADIENT)
                for i, own in zip(indices, layout.states):
                    if name in own:
                        np.copyto(own[name], state[i][name])
        self._state_changed()

    # ----------------------------------------------------------- checkpoints
    def save(self, path, *, params=True):
        """Write a checkpoint: the state dict, registered objects and (``params``)
        the parameter values, to one ``.npz`` file, atomically (a failed save
        leaves any existing file untouched). No pickle."""
        with self._lock:
            checkpoint.save(path, type(self).__name__, self._state_dict(copy_arrays=False),
                            self.params if params else None)

    def load(self, path, *, params=True, strict=True):
        """Restore a checkpoint written by :meth:`save` of the same optimizer class
        (and, with ``params``, the parameter values it holds). Validates it all
        first; raises :class:`CheckpointError` and changes nothing if the file is
        unreadable, corrupted or does not fit."""
        with self._lock:
            self._load_file(path, params, strict)

    def _load_file(self, path, params, strict):
        sd, values = checkpoint.load(path, type(self).__name__)
        try:
            self._load(sd, strict, values if params else None)
        except checkpoint.CheckpointError:
            raise
        except (LookupError, AttributeError, TypeError, ValueError) as error:  # from registered objects too
            raise checkpoint.CheckpointError(f"{path} does not fit this optimizer: {error!r}") from error


def _scalar(value):
    """A 0-d array (or tensor-like with ``item``) as its Python scalar."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def _check_like(value, param, where, buffer=None):
    """``value`` suits ``param``: an array of its dtype and shape, or of the shape
    ``buffer`` (a :class:`~fastdescent.rules._spec.Buffer`) has for it."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype != param.dtype:
        raise TypeError(f"{where} has dtype {value.dtype}; the parameter has {param.dtype}")
    shape = param.shape if buffer is None else buffer.shape_for(param.shape)
    if shape is None:
        raise ValueError(f"{where} is given, but a parameter of shape {param.shape} keeps none")
    if value.shape != shape:
        expected = "the parameter has" if shape == param.shape else f"a parameter of shape {param.shape} keeps"
        raise ValueError(f"{where} has shape {value.shape}; {expected} {shape}")


def _step_count(value, where):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    # The next step must still be a valid step number (_checks.MAX_STEP).
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, Real) or not 0 <= value < _checks.MAX_STEP - 1
            or value != math.floor(value)):
        raise ValueError(f"{where} must be an integer in [0, 2**63 - 1), got {value!r}")
    return int(value)
