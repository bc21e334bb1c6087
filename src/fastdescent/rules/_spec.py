"""The declaration of an update rule, and the one path from it to a kernel.

Each rule is declared once, as a :class:`RuleSpec` in ``fastdescent/rules/<rule>.py``:

* its equations and references (the docstring of its functional face);
* its hyperparameters (:class:`Hyper`: name, default, validation, documentation),
  in ``torch.optim``'s order;
* its state buffers (:class:`Buffer`: name, initial value, the option that needs it);
* the scalars its kernel takes at each step (``scalars``), computed once per call
  in Python doubles so that both backends round the same numbers;
* its ``torch.optim`` peer, and the configurations (:class:`Example`) that the
  catalog, the benchmarks, the demo and the test grids run.

Everything else is derived from the spec: the functional face (:func:`make_face`,
e.g. ``fastdescent.adam_step``), the optimizer class
(:func:`fastdescent.optim.optimizer_class`, e.g. ``fastdescent.Adam``), the PyTorch
drop-in (``fastdescent.torch.Adam``), the catalog, the bench peers, the demo
contenders and the test grids. Every one of them reaches the kernel through
:meth:`RuleSpec.run`, which passes the state buffers by name.
"""

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from .. import _checks
from .._config import effective_n_threads, resolve_backend


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
    """A state buffer, shaped like its parameter and updated in place.

    ``name`` is the key in the optimizer's state (PyTorch's name); ``fill`` its
    initial value: a float, :data:`FIRST_GRADIENT`, :data:`PARAMETER`, or a callable
    of the validated hyperparameters. ``when`` is None for a buffer every step needs, else the
    option that needs it. ``argument`` names the face's argument (default
    ``name + "s"``). ``sample`` says how tests and benchmarks draw random state:
    ``"signed"``, ``"positive"`` (second moments) or ``"zero"``.

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
    #: None: one call of ``backend.<kernel>``.
    runner: Callable | None = None
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

    def __post_init__(self):
        if self.kernel is None:
            object.__setattr__(self, "kernel", self.name)
        if self.uses_step and not self.counts_steps:
            raise ValueError(f"{self.name}: a rule whose update uses the step must count steps")
        optional = False
        for buffer in self.buffers:
            if buffer.when is None and optional:
                raise ValueError(f"{self.name}: declare the always-needed buffers before the optional ones")
            optional = optional or buffer.when is not None
        names = [h.name for h in self.hyper]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a hyperparameter is declared twice")

    # ---------------------------------------------------------------- derived
    @property
    def face_name(self):
        return f"{self.name}_step"

    @property
    def defaults(self):
        """Every hyperparameter's default, and the fixed values."""
        return {**{h.name: h.default for h in self.hyper}, **self.fixed}

    @property
    def buffer_names(self):
        return tuple(b.name for b in self.buffers)

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
        h = {}
        try:
            for hyper in self.hyper:
                h[hyper.name] = hyper.check(hyper.name, values[hyper.name])
            h.update(self.fixed)
            if self.check is not None:
                self.check(h)
        except KeyError as error:
            raise ValueError(f"{where + ' ' if where else ''}lacks the hyperparameter {error}") from None
        except (TypeError, ValueError) as error:
            if where is None:
                raise
            raise type(error)(f"{where}: {error}") from None
        return h

    def needed(self, h):
        """The buffers the validated hyperparameters ``h`` need, in declared order."""
        return [b for b in self.buffers if b.when is None or b.when(h)]

    def check_present(self, h, buffers, fresh_requested=False):
        """ValueError unless ``buffers`` (name -> list or None) holds exactly the
        buffers ``h`` needs."""
        for b in self.buffers:
            given = buffers.get(b.name) is not None
            if b.when is None:
                if not given:
                    raise ValueError(f"{self.face_name} needs {b.face_argument}")
            elif b.when(h) and not given:
                raise ValueError(f"{b.when.text} needs {b.face_argument}")
            elif given and not b.when(h):
                raise ValueError(f"{b.face_argument} given, but they are only used when {b.when.text}")

    def traffic(self, h):
        """(arrays read, arrays written) per element by one step: the parameter,
        the gradient and every needed buffer are read; all but the gradient written."""
        n = len(self.needed(h))
        return 2 + n, 1 + n

    # ------------------------------------------------------------------- run
    def run(self, backend, params, grads, buffers, h, *, step, grad_scale, fresh=frozenset(),
            scalar_state=None, n_threads, formats=None, tensor_ids=None):
        """One update of validated lists: compute the step's scalars and call the
        kernel (or reference twin) of ``backend`` with every buffer by name."""
        kwargs = self.kernel_arguments(h, step=step, grad_scale=grad_scale, fresh=fresh, scalar_state=scalar_state)
        self.call(backend, params, grads, buffers, kwargs, n_threads, formats, tensor_ids)

    def kernel_arguments(self, h, *, step, grad_scale, fresh=frozenset(), scalar_state=None):
        """The kernel's keyword scalars for one step (the first half of :meth:`run`,
        for callers that compute them once and call many times)."""
        return self.scalars(h, step=step, grad_scale=grad_scale, fresh=fresh,
                            **({"scalar_state": scalar_state} if self.scalar_state else {}))

    def call(self, backend, params, grads, buffers, kwargs, n_threads, formats=None, tensor_ids=None):
        """Call the kernel (or reference twin, or the rule's ``runner``) of
        ``backend`` with every buffer by name (the second half of :meth:`run`).

        ``formats`` (from :func:`fastdescent.precision.formats`) describes the
        lists held in low-precision storage: the call then goes through the
        backend's ``stored``, which runs the same float32 kernel on them;
        ``tensor_ids`` identify the tensors in stochastic rounding's bits."""
        if formats:
            backend.stored(getattr(backend, self.kernel), (params, grads),
                           {**buffers, **kwargs, "n_threads": n_threads}, formats, tensor_ids)
        elif self.runner is not None:
            self.runner(backend, params, grads, buffers, kwargs, n_threads)
        else:
            getattr(backend, self.kernel)(params, grads, **buffers, **kwargs, n_threads=n_threads)

    def advanced(self, h, step, scalar_state):
        """The scalar states after step ``step`` (empty if the rule keeps none)."""
        return self.advance(h, step, scalar_state) if self.scalar_state else {}

    # --------------------------------------------------------------- the face
    def face_step(self, params, grads, buffers, values, *, step, grad_scale, first_step, scalar_state,
                  n_threads, backend):
        """What every generated face does: validate everything, then :meth:`run`."""
        h = self.validate(values)
        if self.uses_step:
            step = _checks.step_number("step", step)
        grad_scale = _checks.finite("grad_scale", grad_scale)
        named = dict(zip(self.buffer_names, buffers))
        self.check_present(h, named)
        fresh = frozenset()
        if _checks.boolean("first_step", first_step):
            needed = self.needed(h)
            fresh = frozenset(b.name for b in needed if b.initial(h) is FIRST_GRADIENT)
            if needed and not fresh:
                raise ValueError("first_step=True, but no buffer of this configuration starts as the first gradient")
        if self.scalar_state:
            scalar_state = {s.name: s.initial_value(h) if scalar_state[s.name] is None
                            else _checks.finite(s.name, scalar_state[s.name]) for s in self.scalar_state}
        lists = _checks.validated_lists(self.buffer_names, params, grads, *buffers)
        params, grads = lists[:2]
        self.run(resolve_backend(backend), params, grads, dict(zip(self.buffer_names, lists[2:])), h,
                 step=step, grad_scale=grad_scale, fresh=fresh, scalar_state=scalar_state,
                 n_threads=effective_n_threads(n_threads))
        return self.advanced(h, step, scalar_state) or None


# ------------------------------------------------------------------ the face
def make_face(spec, module):
    """The functional face of ``spec`` (``fastdescent.<name>_step``): a function
    with a real signature (buffers positional, then keyword-only ``step``, the
    hyperparameters with their defaults, ``grad_scale``, ``n_threads``,
    ``backend``), generated as :mod:`dataclasses` generates ``__init__``, so that
    calling it costs no more than calling a hand-written function."""
    first_gradient = spec.may_start_as_gradient
    hyper = [h for h in spec.hyper if h.face]
    args = ["params", "grads"]
    args += [b.face_argument if b.when is None else f"{b.face_argument}=None" for b in spec.buffers]
    kw = (["step"] if spec.uses_step else [])
    kw += [f"{s.name}=None" for s in spec.scalar_state]
    kw += [h.name if h.default is REQUIRED else f"{h.name}=_d_{h.name}" for h in hyper]
    kw += (["first_step=False"] if first_gradient else []) + ["grad_scale=1.0", "n_threads=None", "backend=None"]
    values = ", ".join([f"{h.name!r}: {h.name}" for h in hyper]
                       + [f"{h.name!r}: _d_{h.name}" for h in spec.hyper if not h.face])
    buffers = ", ".join(b.face_argument for b in spec.buffers)
    states = ", ".join(f"{s.name!r}: {s.name}" for s in spec.scalar_state)
    source = (
        f"def {spec.face_name}({', '.join(args)}, *, {', '.join(kw)}):\n"
        f"    return _spec.face_step(params, grads, ({buffers}{',' if len(spec.buffers) == 1 else ''}), "
        f"{{{values}}}, step={'step' if spec.uses_step else 'None'}, grad_scale=grad_scale, "
        f"first_step={'first_step' if first_gradient else 'False'}, scalar_state={{{states}}}, "
        f"n_threads=n_threads, backend=backend)\n"
    )
    namespace = {"_spec": spec, **{f"_d_{h.name}": h.default for h in spec.hyper}}
    exec(source, namespace)  # noqa: S102 - generated from the spec, as dataclasses does
    face = namespace[spec.face_name]
    face.__module__ = module
    face.__qualname__ = spec.face_name
    face.__doc__ = spec.doc.rstrip() + "\n\n" + face_parameters(spec, first_gradient)
    return face


def face_parameters(spec, first_gradient):
    """The numpydoc Parameters section of the face, from the spec."""
    lines = ["Parameters", "----------"]
    names = ", ".join(["params", "grads"] + [b.face_argument for b in spec.buffers])
    lines += [f"{names} : ndarray or list of ndarray",
              "    C-contiguous float32 or float64 arrays, all of one dtype, each shaped like its",
              "    parameter; all but ``grads`` are updated in place."]
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
              "backend : {'kernel', 'reference'} or None", "    None uses :func:`fastdescent.get_backend`."]
    return "\n".join("    " + line if line else "" for line in lines)
