"""The declaration of an update rule, and the one path from it to a kernel.

Each rule is declared once, as a :class:`RuleSpec` in ``fastdescent/rules/<rule>.py``:

* its equations and references (the docstring of its functional face);
* its hyperparameters (:class:`Hyper`: name, default, validation, documentation),
  in ``torch.optim``'s order;
* its state buffers (:class:`Buffer`: name, initial value, the option that needs it,
  and, for a buffer not shaped like its parameter, its shape);
* the scalars its kernel takes at each step (``scalars``), computed once per call
  in Python doubles so that both backends round the same numbers;
* its ``torch.optim`` peer, and the configurations (:class:`Example`) that the
  catalog, the benchmarks, the demo and the test grids run.

Everything else is derived from the spec: the functional face (:func:`make_face`,
e.g. ``fastdescent.adam_step``), the optimizer class
(:func:`fastdescent.optim.optimizer_class`, e.g. ``fastdescent.Adam``), the PyTorch
drop-in (``fastdescent.torch.Adam``), the catalog, the bench peers, the demo
contenders and the test grids. Every one of them reaches the kernel through
:meth:`RuleSpec.run` (or the invoker of :meth:`RuleSpec.prepared`, with the scalars computed once per change),
which passes the state buffers by name.

Hyperparameters are validated once per change, not once per step: a
:class:`Config` holds a validated configuration and what follows from it (the
buffers it needs, the kernel's scalars of the last step), and each spec keeps its
configs in a cache keyed on the hyperparameter values *exactly* (same types,
floats bit for bit; see :class:`fastdescent._runtime.ExactCache`), so that a value
validation would refuse is never taken for one it accepted.
"""

import inspect
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from .. import _checks, _runtime
from .._config import CALL_DEFAULTS, effective_n_threads, resolve_backend


class _Marker:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


#: A hyperparameter without a default (the face and the optimizer require it).
REQUIRED = _Marker("REQUIRED")
#: Initial value of a buffer that the kernel itself initializes at the step that
#: creates it (PyTorch's SGD momentum buffer starts as the first gradient).
FIRST_GRADIENT = _Marker("FIRST_GRADIENT")
#: Initial value of a buffer that starts as a copy of its parameter (Schedule-Free's
#: iterates ``z`` and ``x``).
PARAMETER = _Marker("PARAMETER")

#: No buffer created for this step.
NOTHING_FRESH = frozenset()
#: Validated configurations kept per rule (the cache is emptied when full).
CONFIGS_KEPT = 256

#: The keyword arguments every face takes after the rule's hyperparameters.
GRAD_SCALE_DOC = ("Multiplies every gradient as it is read (loss-scale removal, norm clipping), "
                  "at no extra pass over memory.")


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter: its name, default, validator and documentation.

    ``check(name, value)`` raises TypeError/ValueError for an invalid value and
    returns the value normalized (a Python float, bool, int or tuple).
    ``keyword_only`` places it after ``*`` in the optimizer's signature, as in
    ``torch.optim``; ``face=False`` keeps it out of the functional face (a value
    only the optimizer uses, such as a buffer's initial value); ``torch=False``
    marks an option ``torch.optim``'s peer does not have.
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    type: str = "float"
    keyword_only: bool = False
    face: bool = True
    torch: bool = True


@dataclass(frozen=True)
class When:
    """The condition under which an optional buffer is needed, with its wording."""

    test: Callable[[Mapping], bool]
    text: str

    def __call__(self, hyper):
        return self.test(hyper)


def flag(name):
    """Needed when the boolean hyperparameter ``name`` is true."""
    return When(lambda h: bool(h[name]), f"{name}=True")


def above_zero(name):
    """Needed when the hyperparameter ``name`` is positive."""
    return When(lambda h: h[name] > 0.0, f"{name} > 0")


@dataclass(frozen=True)
class Buffer:
    """A state buffer, updated in place, shaped like its parameter unless ``shape``
    says otherwise.

    ``name`` is the key in the optimizer's state (PyTorch's name); ``fill`` its
    initial value: a float, :data:`FIRST_GRADIENT`, :data:`PARAMETER`, or a callable
    of the validated hyperparameters. ``when`` is None for a buffer every step needs, else the
    option that needs it. ``argument`` names the face's argument (default
    ``name + "s"``). ``sample`` says how tests and benchmarks draw random state:
    ``"signed"``, ``"positive"`` (second moments) or ``"zero"``.

    ``shape(param_shape)`` gives the buffer's shape for a parameter of that shape,
    or None if such a parameter keeps no such buffer (``torch.optim.Adafactor``
    keeps ``row_var`` and ``col_var`` for parameters of two or more dimensions and
    ``variance`` for the others); None (the default): shaped like its parameter. A
    rule with such buffers is ``tensorwise``.

    ``storage`` lists the low-precision state dtypes the buffer may be kept in
    (``state_dtype`` of the optimizers; :mod:`fastdescent.precision`): moments
    and momentum can be, a buffer that is a copy of the parameters (an average
    of iterates) should not go below bfloat16. ``nonnegative``: its values are
    never negative (second moments, sums of squares), so its int8 code spends
    the sign bit on range (None: ``sample == "positive"``).
    """

    name: str
    fill: Any = 0.0
    when: When | None = None
    argument: str | None = None
    sample: str = "signed"
    doc: str = ""
    shape: Callable | None = None
    storage: tuple = ("bfloat16", "int8")
    nonnegative: bool | None = None

    def __post_init__(self):
        if self.nonnegative is None:
            object.__setattr__(self, "nonnegative", self.sample == "positive")
        unknown = set(self.storage) - {"bfloat16", "int8"}
        if unknown:
            raise ValueError(f"buffer {self.name}: unknown storage {sorted(unknown)}")

    @property
    def face_argument(self):
        return self.argument or self.name + "s"

    def shape_for(self, param_shape):
        """The buffer's shape for a parameter of ``param_shape``, or None if such a
        parameter keeps none."""
        param_shape = tuple(param_shape)
        return param_shape if self.shape is None else self.shape(param_shape)

    def initial(self, hyper):
        """The buffer's initial value for the validated hyperparameters ``hyper``."""
        return self.fill(hyper) if callable(self.fill) else self.fill


@dataclass(frozen=True)
class ScalarState:
    """A per-parameter scalar the rule keeps in its state besides ``step`` (for
    example NAdam's ``mu_product``): the face takes its current value by keyword
    and returns the new one; the optimizers store it. ``initial`` is a float or a
    callable of the validated hyperparameters (ASGD's ``eta`` starts at ``lr``)."""

    name: str
    initial: Any
    doc: str

    def initial_value(self, hyper):
        return self.initial(hyper) if callable(self.initial) else self.initial


@dataclass(frozen=True)
class Example:
    """A named configuration of a rule: ``options`` override the defaults.

    Every example is in the test grids. ``bench`` puts it in the catalog (the CLI,
    ``bench`` and asv); ``demo`` = (family, learning rate of the MLP) makes it a
    contender of the demo, whose races pick a learning rate per family.
    """

    name: str
    options: Mapping = field(default_factory=dict)
    description: str = ""
    bench: bool = False
    demo: tuple | None = None


@dataclass(frozen=True, eq=False)
class RuleSpec:
    """One update rule, declared once. See the module docstring."""

    #: Lower-case name: the face is ``<name>_step``, the kernel ``<kernel>``.
    name: str
    #: The class name (``Adam``), shared by ``fastdescent`` and ``fastdescent.torch``.
    title: str
    #: The face's docstring without its Parameters section: the equations, the
    #: paper, and where conventions differ.
    doc: str
    hyper: tuple
    buffers: tuple
    #: ``scalars(h, step=, grad_scale=, fresh=, scalar_state=)`` -> the kernel's
    #: keyword arguments besides the buffers and ``n_threads``: ``h`` the validated
    #: hyperparameters, ``step`` the 1-based index of the step being taken (None if
    #: the rule does not count steps), ``fresh`` the names of the buffers created
    #: for this step, ``scalar_state`` the scalar states before it.
    scalars: Callable
    #: For a rule whose update uses the step: the names of the kernel scalars that
    #: change with it, and ``step_scalars(h, step)`` -> their values, a tuple in that
    #: order, the same numbers ``scalars`` gives (a test checks it). Declared, they let
    #: the faces and the optimizers run ``scalars`` once per change of the
    #: hyperparameters (and of ``grad_scale``) and only ``step_scalars`` at each step.
    step_scalar_names: tuple = ()
    step_scalars: Callable | None = None
    #: The kernel (and reference twin) function; default ``name``.
    kernel: str | None = None
    #: The state keeps ``step``, the number of steps taken (PyTorch's layout).
    counts_steps: bool = True
    #: The update depends on the step's index (bias corrections, decays): the face
    #: takes ``step``, and parameters at different counts need separate calls.
    uses_step: bool = True
    #: ``check(h)``: constraints between hyperparameters (raise ValueError).
    check: Callable | None = None
    #: Hyperparameters with a fixed value (AdamW's ``decoupled_weight_decay``).
    fixed: Mapping = field(default_factory=dict)
    scalar_state: tuple = ()
    #: ``advance(h, step, scalar_state)`` -> the scalar states after the step.
    advance: Callable | None = None
    #: ``runner(backend, params, grads, buffers, kwargs, n_threads)`` for a rule that
    #: is more than one elementwise kernel call (a reduction pass first, a matmul);
    #: None: one call of ``backend.<kernel>``. A buffer list it gets may hold None
    #: for the parameters that keep no such buffer (``Buffer.shape``).
    runner: Callable | None = None
    #: The update of a parameter depends on the whole parameter in its shape (its
    #: norms, its rows and columns: Adafactor; its matrix: Muon), not on each element
    #: alone. Its parameters are then never concatenated: a flat arena hands the
    #: ``runner`` each parameter's own view, ``fastdescent.torch`` hands it each
    #: parameter contiguous in its logical order and in its shape (a scratch copy of
    #: one laid out otherwise) and refuses complex ones, and the ZeRO-sharded
    #: optimizer refuses the rule.
    tensorwise: bool = False
    #: Every parameter must have this many dimensions (Muon: 2, it orthogonalizes
    #: matrices), or None for any shape. Checked before anything is written. Such a
    #: rule is ``tensorwise``.
    param_ndim: int | None = None
    #: ``passes(h)`` -> the memory passes of a runner's kernel calls, in order, each
    #: ``(arrays read, arrays written)`` per element (for a parameter of
    #: :meth:`sample_shape`, the shape the benchmarks use); None: the one pass of
    #: :meth:`kernel_passes`. What the benchmarks count, and their ceiling models.
    passes: Callable | None = None
    #: ``check_storage(h, state_dtype)``: raise ValueError if the rule, configured
    #: as ``h``, cannot keep its state in ``state_dtype`` ("bfloat16" or "int8")
    #: although each buffer could (a difference of two buffers that rounding
    #: makes negative). None: any configuration can.
    check_storage: Callable | None = None
    #: The ``torch.optim`` class of the same semantics, if any.
    torch: str | None = None
    #: A class whose methods the rule adds to its optimizer classes, ``fastdescent.<Rule>``
    #: and ``fastdescent.torch.<Rule>`` (it comes first among their bases), such as
    #: Schedule-Free's ``train()`` and ``eval()``. It reaches the arrays through
    #: ``self._update_state(g, names, update)``, which both classes provide.
    mixin: type | None = None
    examples: tuple = ()
    #: One line for tables and class docstrings.
    summary: str = ""
    #: The year of the rule's paper: the registry lists rules in that order (the
    #: order in which they are usually taught).
    year: int = 0
    #: Validated configurations by their hyperparameter values (see :meth:`configure`).
    _configs: Any = field(default_factory=lambda: _runtime.ExactCache(CONFIGS_KEPT), init=False, repr=False)
    #: Kernel callers by the names of the scalars (see :meth:`prepared`).
    _invokers: dict = field(default_factory=dict, init=False, repr=False)
    #: The hyperparameters' names in declared order (the order of a Config's values).
    hyper_names: tuple = field(init=False, repr=False)
    #: The state buffers' names in declared order.
    buffer_names: tuple = field(init=False, repr=False)
    #: The scalar states' names in declared order.
    scalar_state_names: tuple = field(init=False, repr=False)

    def __post_init__(self):
        if self.kernel is None:
            object.__setattr__(self, "kernel", self.name)
        # What every face call needs, worked out once: the buffers' roles (the face's
        # argument names, for errors) and which of them are written.
        roles = ("params", "grads", *(b.face_argument for b in self.buffers))
        object.__setattr__(self, "_roles", roles)
        object.__setattr__(self, "buffer_names", tuple(b.name for b in self.buffers))
        object.__setattr__(self, "scalar_state_names", tuple(s.name for s in self.scalar_state))
        object.__setattr__(self, "hyper_names", tuple(h.name for h in self.hyper))
        object.__setattr__(self, "_hyper_getter", _tuple_getter(self.hyper_names))
        object.__setattr__(self, "_writable", (True, False) + (True,) * len(self.buffers))
        # The buffers shaped otherwise than their parameters (see Buffer.shape).
        object.__setattr__(self, "_shaped", tuple(b.name for b in self.buffers if b.shape is not None))
        if self.uses_step and not self.counts_steps:
            raise ValueError(f"{self.name}: a rule whose update uses the step must count steps")
        if (self.step_scalars is None) != (not self.step_scalar_names) or (self.step_scalars and not self.uses_step):
            raise ValueError(f"{self.name}: step_scalars and step_scalar_names go together, for a rule that uses the step")
        optional = False
        for buffer in self.buffers:
            if buffer.when is None and optional:
                raise ValueError(f"{self.name}: declare the always-needed buffers before the optional ones")
            optional = optional or buffer.when is not None
        names = [h.name for h in self.hyper]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a hyperparameter is declared twice")
        if any(b.shape is not None for b in self.buffers) and not self.tensorwise:
            raise ValueError(f"{self.name}: a rule with buffers shaped otherwise than their parameter is tensorwise")
        if self.tensorwise and self.runner is None:
            raise ValueError(f"{self.name}: a tensorwise rule needs a runner (one elementwise kernel cannot see shapes)")
        if self.param_ndim is not None and not self.tensorwise:
            raise ValueError(f"{self.name}: a rule of {self.param_ndim}-D parameters is tensorwise")

    # ---------------------------------------------------------------- derived
    @property
    def face_name(self):
        return f"{self.name}_step"

    @property
    def defaults(self):
        """Every hyperparameter's default, and the fixed values."""
        return {**{h.name: h.default for h in self.hyper}, **self.fixed}

    @property
    def may_start_as_gradient(self):
        """True if some configuration has a buffer that starts as the first gradient
        (then the face takes ``first_step``)."""
        return any(b.fill is FIRST_GRADIENT or (callable(b.fill) and b.initial(self.defaults) is FIRST_GRADIENT)
                   for b in self.buffers)

    def variant(self, **changes):
        """A spec derived from this one (AdamW from Adam): ``defaults`` (a dict)
        replaces hyperparameter defaults, ``fixed`` removes hyperparameters from the
        signatures and pins their values; any other field is replaced as given."""
        defaults = changes.pop("defaults", {})
        fixed = {**self.fixed, **changes.pop("fixed", {})}
        hyper = tuple(replace(h, default=defaults.get(h.name, h.default)) for h in self.hyper if h.name not in fixed)
        return replace(self, hyper=hyper, fixed=fixed, **changes)

    # ------------------------------------------------------------- validation
    def validate(self, values, where=None):
        """The validated hyperparameters (normalized values) from ``values``, a
        mapping holding at least every declared name (extra keys are ignored).
        Raises TypeError/ValueError naming the hyperparameter (prefixed by
        ``where``) or, for a missing one, ValueError."""
        return self._validated(self.values_of(values, where), where)

    def values_of(self, mapping, where=None):
        """The hyperparameters of ``mapping`` as a tuple in declared order (the key
        of :meth:`configure`); ValueError naming a missing one."""
        try:
            return self._hyper_getter(mapping)
        except KeyError as error:
            raise ValueError(f"{where + ' ' if where else ''}lacks the hyperparameter {error}") from None

    def _validated(self, values, where, previous=None):
        """Validate ``values`` (a tuple in declared order). With ``previous`` (a
        :class:`Config` of immutable values), only the values that are not the very
        objects ``previous`` validated are checked again; the constraints between
        hyperparameters (``check``) always run."""
        if previous is not None and previous.trusted:
            h = dict(previous.hyper)
            changed = [(hyper, value) for hyper, value, old in zip(self.hyper, values, previous.values)
                       if value is not old]
        else:
            h, changed = {}, zip(self.hyper, values)
        try:
            for hyper, value in changed:
                h[hyper.name] = hyper.check(hyper.name, value)
            h.update(self.fixed)
            if self.check is not None:
                self.check(h)
        except (TypeError, ValueError) as error:
            if where is None:
                raise
            raise type(error)(f"{where}: {error}") from None
        return h

    def configure(self, values, where=None, previous=None):
        """The :class:`Config` of ``values`` (the hyperparameters as a tuple in
        declared order, as :meth:`values_of` gives them): from the cache if these
        exact values were validated before, else validated now (see
        :meth:`_validated` for ``previous``) and cached if they are immutable."""
        config = self._configs.get(values)
        if config is None:
            config = Config(self, values, self._validated(values, where, previous))
            self._configs.put(values, config)
        return config

    def needed(self, h):
        """The buffers the validated hyperparameters ``h`` need, in declared order."""
        return [b for b in self.buffers if b.when is None or b.when(h)]

    def kept(self, h, shape):
        """The buffers a parameter of ``shape`` keeps under the validated
        hyperparameters ``h`` (those it needs, less those its shape has none of)."""
        return [b for b in self.needed(h) if b.shape is None or b.shape_for(shape) is not None]

    def check_present(self, h, buffers, fresh_requested=False):
        """ValueError unless ``buffers`` (name -> list or None) holds exactly the
        buffers ``h`` needs (those shaped otherwise than their parameters are
        checked by :meth:`shaped_lists`, which sees the parameters' shapes)."""
        for b in self.buffers:
            if b.shape is not None:
                continue
            given = buffers.get(b.name) is not None
            if b.when is None:
                if not given:
                    raise ValueError(f"{self.face_name} needs {b.face_argument}")
            elif b.when(h) and not given:
                raise ValueError(f"{b.when.text} needs {b.face_argument}")
            elif given and not b.when(h):
                raise ValueError(f"{b.face_argument} given, but they are only used when {b.when.text}")

    def check_shape(self, shape, where):
        """ValueError unless a parameter of ``shape`` suits the rule (``param_ndim``)."""
        if self.param_ndim is not None and len(shape) != self.param_ndim:
            raise ValueError(f"{where} has shape {tuple(shape)}, but {self.title} takes {self.param_ndim}-D "
                             "parameters only")

    def shaped_lists(self, h, named, params, grads, indexed):
        """The validated lists of the buffers shaped otherwise than their parameters
        (name -> list, None where a parameter keeps none) from the face's arguments
        ``named`` (name -> None, an array or a list), for validated ``params`` and
        ``grads`` (``indexed``: the face got lists). Each parameter must have
        exactly the buffers its shape keeps, of that shape, of its dtype, writable and
        C-contiguous; no array written may share memory with any other of the call."""
        shaped = [b for b in self.buffers if b.shape is not None]
        lists = {}
        for b in shaped:
            needed = b.when is None or b.when(h)
            shapes = [b.shape_for(p.shape) if needed else None for p in params]
            value = named.get(b.name)
            if value is not None and not needed:
                raise ValueError(f"{b.face_argument} given, but they are only used when {b.when.text}")
            if value is None and any(s is not None for s in shapes):
                need = self.face_name if b.when is None else b.when.text
                raise ValueError(f"{need} needs {b.face_argument} for parameters of shape "
                                 f"{params[next(k for k, s in enumerate(shapes) if s is not None)].shape}")
            lists[b.name] = _checks.shaped_list(b.face_argument, value, params, shapes, indexed)
        written = {"params": params, **{b.face_argument: lists[b.name] if b.shape is not None else named.get(b.name)
                                        for b in self.buffers}}
        _checks.check_disjoint(written, {"grads": grads}, indexed)
        return lists

    def sample_shape(self, n):
        """A shape of ``n`` elements that the rule takes, for tests and benchmarks:
        ``(n,)``, or for a tensorwise rule the squarest matrix (rows <= columns) of
        ``n`` elements, so that its shape-dependent work (Adafactor's factors) is what
        is measured; for a rule of matrices (``param_ndim``) at most 64 rows, so that a
        benchmark's matrix products (Muon's) stay cheap. (0, 1) for none
        (torch.optim.Muon divides by the number of columns)."""
        if not self.tensorwise:
            return (n,)
        if self.param_ndim not in (None, 2):
            raise NotImplementedError(f"sample shapes of {self.param_ndim}-D parameters")
        most = 64 if self.param_ndim is not None else math.isqrt(n)
        rows = max((r for r in range(1, min(math.isqrt(n), most) + 1) if n % r == 0), default=0)
        return (rows, n // rows) if rows else (0, 1)

    def kernel_passes(self, h):
        """``[(arrays read, arrays written)]`` per element, one pair per memory pass
        of a step: ``passes(h)`` if declared, else one pass in which the parameter,
        the gradient and every needed buffer are read, and all but the gradient written."""
        if self.passes is not None:
            return list(self.passes(h))
        n = len(self.needed(h))
        return [(2 + n, 1 + n)]

    def traffic(self, h):
        """(arrays read, arrays written) per element by all the memory passes of a step."""
        passes = self.kernel_passes(h)
        return sum(reads for reads, _ in passes), sum(writes for _, writes in passes)

    # ------------------------------------------------------------------- run
    def run(self, backend, params, grads, buffers, h, *, step, grad_scale, fresh=NOTHING_FRESH,
            scalar_state=None, n_threads, formats=None, tensor_ids=None):
        """One update of validated lists: compute the step's scalars and call the
        kernel (or reference twin) of ``backend`` with every buffer (``buffers``:
        name -> list or None) by name."""
        kwargs = self.kernel_arguments(h, step=step, grad_scale=grad_scale, fresh=fresh, scalar_state=scalar_state)
        self.call(backend, params, grads, buffers, kwargs, n_threads, formats, tensor_ids)

    def kernel_arguments(self, h, *, step, grad_scale, fresh=NOTHING_FRESH, scalar_state=None):
        """The kernel's keyword scalars for one step (the first half of :meth:`run`,
        for callers that compute them once and call many times)."""
        return self.scalars(h, step=step, grad_scale=grad_scale, fresh=fresh,
                            **({"scalar_state": scalar_state} if self.scalar_state else {}))

    def call(self, backend, params, grads, buffers, kwargs, n_threads, formats=None, tensor_ids=None):
        """Call the kernel (or reference twin, or the rule's ``runner``) of
        ``backend`` with every buffer (name -> list or None) by name and the
        scalars ``kwargs`` (the second half of :meth:`run`), through the
        :meth:`prepared` invoker.

        ``formats`` (from :func:`fastdescent.precision.formats`) describes the
        lists held in low-precision storage: the call then goes through the
        backend's ``stored``, which runs the same float32 kernel on them;
        ``tensor_ids`` identify the tensors in stochastic rounding's bits."""
        if formats:
            backend.stored(getattr(backend, self.kernel), (params, grads),
                           {**buffers, **kwargs, "n_threads": n_threads}, formats, tensor_ids)
            return
        invoke, constants = self.prepared(kwargs)
        invoke(backend, params, grads, tuple([buffers.get(name) for name in self.buffer_names]), constants,
               self.varying(kwargs), n_threads)

    def varying(self, scalars):
        """The values of the ``step_scalar_names`` in ``scalars`` (a dict), in order."""
        return tuple([scalars[name] for name in self.step_scalar_names])

    def prepared(self, scalars):
        """``(invoke, constants)`` for the kernel scalars ``scalars`` (a dict, from
        :attr:`scalars`): ``constants`` are the values of those not in
        ``step_scalar_names``, and

        ``invoke(backend, params, grads, buffers, constants, varying, n_threads)``

        is the one way to a kernel: it calls ``backend.<kernel>`` (kernel or
        reference twin), or the rule's ``runner``, on validated lists, with
        ``buffers`` (one list or None per declared buffer, in declared order) and
        the scalars (``constants``, then ``varying``: the ``step_scalar_names``) by
        name. It is a :class:`~fastdescent._runtime.KernelCall`, made once per set
        of scalar names."""
        invoke, constants = self._invokers.get(tuple(scalars)) or self._invoker(tuple(scalars))
        return invoke, constants(scalars)

    def _invoker(self, scalar_names):
        """``(invoke, getter of the constants)`` for scalars named ``scalar_names``."""
        constant_names = tuple([name for name in scalar_names if name not in self.step_scalar_names])
        if self.runner is None:
            invoke = _runtime.KernelCall(self.kernel, self.buffer_names, constant_names, self.step_scalar_names)
        else:
            all_names = (*constant_names, *self.step_scalar_names)

            def invoke(backend, params, grads, buffers, constants, varying, n_threads):
                self.runner(backend, params, grads, dict(zip(self.buffer_names, buffers)),
                            dict(zip(all_names, constants + varying)), n_threads)
        self._invokers[scalar_names] = invoke, _tuple_getter(constant_names)
        return self._invokers[scalar_names]

    def advanced(self, h, step, scalar_state):
        """The scalar states after step ``step`` (empty if the rule keeps none)."""
        return self.advance(h, step, scalar_state) if self.scalar_state else {}

    # --------------------------------------------------------------- the face
    def face_step(self, params, grads, buffers, present, values, step, grad_scale, first_step, scalar_state,
                  n_threads, backend):
        """What every generated face does: check everything, then call the kernel.

        ``buffers`` are the state buffers in declared order (None where not
        given), ``present`` says which are given, ``values`` are the
        hyperparameters in declared order. The face's
        :class:`~fastdescent._runtime.Face` does the same in C for the
        common case: a cache lookup for the hyperparameters (:meth:`configure`),
        a few identity and type tests, one C call that checks every array
        (:func:`~fastdescent._runtime.checked_lists`) and, for a rule that declares
        them, the ``step_scalars``.
        """
        config = self._configs.get(values) or self.configure(values)
        if self.uses_step and (type(step) is not int or not 0 < step < _checks.MAX_STEP):
            step = _checks.step_number("step", step)
        if type(grad_scale) is not float or not -math.inf < grad_scale < math.inf:
            grad_scale = _checks.finite("grad_scale", grad_scale)
        if present != config.present:
            self.check_present(config.hyper, dict(zip(self.buffer_names, buffers)))
        fresh = NOTHING_FRESH if first_step is False else self._fresh(config, first_step)
        if self.scalar_state:
            scalar_state = self._scalar_state_before(config, scalar_state)
        if self._shaped:
            lists = self._checked_shaped(config.hyper, params, grads, buffers)
        else:
            lists = _runtime.checked_lists(self._roles, (params, grads, *buffers), self._writable)
        if self.param_ndim is not None:
            for k, p in enumerate(lists[0]):
                self.check_shape(p.shape, f"params[{k}]")
        kernels = resolve_backend(backend)
        n_threads = effective_n_threads(n_threads)
        invoke, constants, varying = config.kernel_arguments(step, grad_scale, fresh, scalar_state)
        invoke(kernels, lists[0], lists[1], lists[2:], constants, varying, n_threads)
        if self.scalar_state:
            return self.advanced(config.hyper, step, scalar_state)

    def _checked_shaped(self, h, params, grads, buffers):
        """What ``checked_lists`` gives a face call (params, grads, then each buffer's
        list or None, in declared order), for a rule with buffers shaped otherwise than
        their parameters: those shaped like them through ``checked_lists``, the
        others through :meth:`shaped_lists`."""
        like = [k for k, b in enumerate(self.buffers) if b.shape is None]
        checked = _runtime.checked_lists((*self._roles[:2], *(self._roles[2 + k] for k in like)),
                                         (params, grads, *(buffers[k] for k in like)),
                                         (True, False) + (True,) * len(like))
        named = dict(zip(self.buffer_names, buffers))
        named.update((self.buffer_names[k], arrays) for k, arrays in zip(like, checked[2:]))
        indexed = _checks.tensor_lists(params)[0]
        named.update(self.shaped_lists(h, named, checked[0], checked[1], indexed))
        return (checked[0], checked[1], *(named[name] for name in self.buffer_names))

    def _fresh(self, config, first_step):
        """The buffers a face call with ``first_step`` initialises from the gradient."""
        if not _checks.boolean("first_step", first_step):
            return NOTHING_FRESH
        if config.needed and not config.fresh_first:
            raise ValueError("first_step=True, but no buffer of this configuration starts as the first gradient")
        return config.fresh_first

    def _scalar_state_before(self, config, given):
        """The scalar states a face call starts from: as given (finite), or initial if None."""
        return {s.name: s.initial_value(config.hyper) if given[s.name] is None else _checks.finite(s.name, given[s.name])
                for s in self.scalar_state}


def _tuple_getter(keys):
    """``mapping -> tuple(mapping[k] for k in keys)``, in C (``operator.itemgetter``)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda mapping: (mapping[key],)
    return operator.itemgetter(*keys) if keys else (lambda mapping: ())


class Config:
    """One validated configuration of a rule, and what follows from it, worked
    out once per change of the hyperparameters (:meth:`RuleSpec.configure`).

    ``values``: the hyperparameters as given (declared order); ``hyper``: validated
    (never modify it: configs are shared); ``trusted``: the values are immutable
    (see :func:`fastdescent._runtime.immutable`), so the very same objects mean the
    same values and an optimizer need not validate them again; ``needed``: the
    buffers they need (name -> initial value); ``present``: per declared buffer,
    whether it is needed (configs with equal ``present`` hand a kernel the same
    buffers); ``fresh_first``: the buffers that start as the first gradient.
    """

    __slots__ = ("spec", "values", "hyper", "trusted", "needed", "present", "fresh_first", "arguments")

    def __init__(self, spec, values, hyper):
        self.spec, self.values, self.hyper = spec, values, hyper
        self.trusted = _runtime.immutable(values)
        self.needed = {b.name: b.initial(hyper) for b in spec.needed(hyper)}
        self.present = tuple([name in self.needed for name in spec.buffer_names])
        self.fresh_first = frozenset([name for name, fill in self.needed.items() if fill is FIRST_GRADIENT])
        #: The kernel call and scalars step after step (computed again only when needed).
        self.arguments = _runtime.KernelArguments(spec, hyper)

    def kernel_arguments(self, step, grad_scale, fresh=NOTHING_FRESH, scalar_state=None):
        """``(invoke, constants, varying)`` for a step (see :meth:`RuleSpec.prepared`).

        ``spec.scalars`` runs again only when needed (see
        :class:`~fastdescent._runtime.KernelArguments`), except for a rule that
        keeps scalar state: its scalars depend on that state, so they are computed
        at every call."""
        spec = self.spec
        if spec.scalar_state:
            scalars = spec.scalars(self.hyper, step=step, grad_scale=grad_scale, fresh=fresh, scalar_state=scalar_state)
            return (*spec.prepared(scalars), spec.varying(scalars))
        return self.arguments.get(step, grad_scale, fresh)

    def stateful_arguments(self, step, grad_scale, fresh, values):
        """``(invoke, constants, varying, after)`` for a step of a rule that keeps
        scalar state, from the scalar states ``values`` before it (a tuple in declared
        order): :meth:`kernel_arguments`, and ``after``, the scalar states after the
        step (``spec.advance``), a tuple in the same order. What a step plan that
        keeps the scalar states in C needs of the rule, in one call."""
        spec = self.spec
        state = dict(zip(spec.scalar_state_names, values))
        after = spec.advance(self.hyper, step, state)
        return (*self.kernel_arguments(step, grad_scale, fresh, state),
                tuple([after[name] for name in spec.scalar_state_names]))


# ------------------------------------------------------------------ the face
def make_face(spec, module):
    """The functional face of ``spec`` (``fastdescent.<name>_step``): a
    :class:`~fastdescent._runtime.Face`, callable from C, with a real signature
    (buffers positional, then keyword-only ``step``, the hyperparameters with
    their defaults, ``grad_scale``, ``n_threads``, ``backend``). It runs the
    common case in C and hands anything else to :meth:`RuleSpec.face_step`."""
    first_gradient = spec.may_start_as_gradient
    P = inspect.Parameter
    parameters = [P("params", P.POSITIONAL_OR_KEYWORD), P("grads", P.POSITIONAL_OR_KEYWORD)]
    parameters += [P(b.face_argument, P.POSITIONAL_OR_KEYWORD, default=P.empty if b.when is None else None)
                   for b in spec.buffers]
    keywords = [("step", REQUIRED)] if spec.uses_step else []
    keywords += [(s.name, None) for s in spec.scalar_state]
    keywords += [(h.name, h.default) for h in spec.hyper if h.face]
    keywords += ([("first_step", False)] if first_gradient else []) + [("grad_scale", 1.0), ("n_threads", None),
                                                                      ("backend", None)]
    parameters += [P(name, P.KEYWORD_ONLY, default=P.empty if default is REQUIRED else default)
                   for name, default in keywords]
    names = [p.name for p in parameters]
    # Then the hyperparameters the face does not take, at their defaults.
    hidden = [h for h in spec.hyper if not h.face]
    defaults = [REQUIRED if p.default is P.empty else p.default for p in parameters] + [h.default for h in hidden]
    slot = {name: k for k, name in enumerate(names + [f"-{h.name}" for h in hidden])}
    slots = (tuple(slot[b.face_argument] for b in spec.buffers),
             tuple(slot[h.name if h.face else f"-{h.name}"] for h in spec.hyper),
             slot.get("step", -1), tuple((s.name, slot[s.name]) for s in spec.scalar_state),
             slot.get("first_step", -1), slot["grad_scale"], slot["n_threads"], slot["backend"])
    # The C fast path knows nothing of scalar states or shapes: those rules take face_step.
    simple = not spec.scalar_state and not spec._shaped and spec.param_ndim is None
    face = _runtime.Face(spec.face_name, tuple(names), 2 + len(spec.buffers), tuple(defaults), REQUIRED, slots,
                         spec._configs, spec._roles, spec._writable, spec.uses_step, simple, spec.face_step,
                         CALL_DEFAULTS, NOTHING_FRESH)
    face.__module__, face.__name__, face.__qualname__ = module, spec.face_name, spec.face_name
    face.__doc__ = spec.doc.rstrip() + "\n\n" + face_parameters(spec, first_gradient)
    face.__signature__ = inspect.Signature(parameters)
    return face


def face_parameters(spec, first_gradient):
    """The numpydoc Parameters section of the face, from the spec."""
    lines = ["Parameters", "----------"]
    names = ", ".join(["params", "grads"] + [b.face_argument for b in spec.buffers])
    lines += [f"{names} : ndarray or list of ndarray",
              "    C-contiguous float32 or float64 arrays, all of one dtype, each shaped like its",
              "    parameter unless said otherwise below; all but ``grads`` are updated in place."]
    for b in spec.buffers:
        need = "always" if b.when is None else f"iff {b.when.text}"
        start = ("the first gradient (pass ``first_step=True``)" if b.fill is FIRST_GRADIENT
                 else "a copy of the parameter" if b.fill is PARAMETER
                 else "zero" if b.fill == 0.0 else repr(b.fill) if not callable(b.fill) else "see the optimizer")
        lines.append(f"    ``{b.face_argument}`` ({b.name}; needed {need}; PyTorch starts it at {start}){': ' + b.doc if b.doc else ''}.")
    if spec.uses_step:
        lines += ["step : int", "    The 1-based index of the step being taken (PyTorch's ``state['step']`` after",
                  "    its increment)."]
    for s in spec.scalar_state:
        lines += [f"{s.name} : float or None", f"    {s.doc} None: its initial value, for the first step. The face",
                  "    returns the values after the step in a dict: pass them to the next step."]
    for h in spec.hyper:
        if h.face:
            lines += [f"{h.name} : {h.type}", f"    {h.doc}"]
    if first_gradient:
        lines += ["first_step : bool", "    The buffers were just created: initialise them from the gradient",
                  "    instead of updating them (PyTorch's lazily created buffer)."]
    lines += ["grad_scale : float", f"    {GRAD_SCALE_DOC}",
              "n_threads : int or None", "    See :func:`fastdescent.get_num_threads`.",
              "backend : {'kernel', 'reference'} or None", "    None uses :func:`fastdescent.get_backend`.",
              "", "Notes", "-----",
              "Everything is checked before any array is written; a call that raises changes",
              "nothing. No buffer that is written may share memory with any other buffer of",
              "the call (the gradients, only read, may share memory with each other). The",
              "face takes no lock: two threads updating the same arrays at once race, as",
              "two NumPy in-place operations would; an optimizer serializes its steps."]
    return "\n".join("    " + line if line else "" for line in lines)
