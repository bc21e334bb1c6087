"""The optimizer class of a rule, derived from its spec.

:func:`optimizer_class` turns a :class:`~fastdescent.rules._spec.RuleSpec` into a
:class:`~fastdescent.optim.Optimizer` subclass whose constructor has
``torch.optim``'s signature for that rule (the same positional order and
defaults, PyTorch's keyword-only options after ``*``), followed by the options
every fastdescent optimizer takes.
"""

from ..rules._spec import REQUIRED
from .base import Optimizer

#: The options of :class:`Optimizer` itself, after the rule's hyperparameters.
OPTIONS = ("flat=False", "clip_grad_norm=None", "clip_grad_value=None", "skip_nonfinite=False",
           "backend=None", "n_threads=None", "accumulate_steps=1")


def generated_init(spec, module, qualname, body, namespace, options=()):
    """``__init__(self, params, <hyperparameters>, *, <keyword-only ones>, <options>)``
    with the spec's defaults, generated as :mod:`dataclasses` generates one.
    ``body`` is its source (indented lines), which sees ``defaults``: every
    hyperparameter's value and the fixed ones, the parameter groups' defaults."""
    positional = [h for h in spec.hyper if not h.keyword_only]
    keyword = [h for h in spec.hyper if h.keyword_only]

    def parameter(h):
        return h.name if h.default is REQUIRED else f"{h.name}=_d_{h.name}"

    signature = ", ".join(["self", "params", *map(parameter, positional), "*", *map(parameter, keyword), *options])
    defaults = ", ".join([f"{h.name}={h.name}" for h in spec.hyper] + [f"{k}={v!r}" for k, v in spec.fixed.items()])
    source = f"def __init__({signature}):\n    defaults = dict({defaults})\n{body}"
    namespace = {**namespace, **{f"_d_{h.name}": h.default for h in spec.hyper}}
    exec(source, namespace)  # noqa: S102 - generated from the spec, as dataclasses does
    init = namespace["__init__"]
    init.__qualname__ = f"{qualname}.__init__"
    init.__module__ = module
    return init


def optimizer_class(spec, module):
    """A subclass of :class:`Optimizer` for ``spec``, named ``spec.title``, placed
    in ``module``."""
    options = ", ".join(f"{o.split('=')[0]}={o.split('=')[0]}" for o in OPTIONS)
    init = generated_init(spec, module, spec.title, f"    Optimizer.__init__(self, params, defaults, {options})\n",
                          {"Optimizer": Optimizer}, OPTIONS)
    bases = (Optimizer,) if spec.mixin is None else (spec.mixin, Optimizer)
    return type(spec.title, bases, {"spec": spec, "__init__": init, "__module__": module,
                                           "__doc__": class_doc(spec)})


def class_doc(spec, torch=False):
    """The class docstring: what it is, its hyperparameters and its state
    (``torch``: of the ``fastdescent.torch`` class of a rule ``torch.optim`` lacks)."""
    peer = f", as ``torch.optim.{spec.torch}``" if spec.torch else ""
    lines = [f"{spec.summary[0].upper()}{spec.summary[1:]}{peer}.", "",
             f"Equations, conventions and references: :func:`fastdescent.{spec.face_name}`."]
    if torch:
        lines += ["A ``torch.optim.Optimizer`` stepped by fastdescent's fused multi-tensor kernel (``torch.optim``",
                  "has no such rule); see :mod:`fastdescent.torch` for what runs and what raises.", "",
                  "Parameters", "----------", "params : iterable of torch.Tensor, or of dict",
                  "    The parameters, or parameter groups (dicts with ``'params'`` and any"]
    else:
        lines += ["The keyword options shared by every optimizer (``flat``, ``clip_grad_norm``, ``clip_grad_value``,",
                  "``skip_nonfinite``, ``backend``, ``n_threads``, ``accumulate_steps``) are described in",
                  ":class:`fastdescent.optim.Optimizer`.", "", "Parameters", "----------",
                  "params : list of ndarray, or list of dict",
                  "    The parameters, or parameter groups (dicts with ``'params'`` and any"]
    lines += ["    hyperparameters that differ from the defaults below)."]
    for h in spec.hyper:
        lines += [f"{h.name} : {h.type}", f"    {h.doc}"]
    state = ["step"] if spec.counts_steps else []
    state += [s.name for s in spec.scalar_state]
    for b in spec.buffers:
        state.append(f"{b.name}" + (f" (if {b.when.text})" if b.when else ""))
    lines += ["", "Notes", "-----", "State per parameter (PyTorch's names, only what the configuration needs): "
              + ", ".join(f"``{s}``" for s in state) + "."]
    return "\n".join(("    " + line if line and i else line) for i, line in enumerate(lines))
