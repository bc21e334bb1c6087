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
           "backend=None", "n_threads=None", "state_dtype=None", "rounding='nearest'", "seed=None",
           "master_weights=False")


def optimizer_class(spec, module):
    """A subclass of :class:`Optimizer` for ``spec``, named ``spec.title``, placed
    in ``module``."""
    positional = [h for h in spec.hyper if not h.keyword_only]
    keyword = [h for h in spec.hyper if h.keyword_only]

    def parameter(h):
        return h.name if h.default is REQUIRED else f"{h.name}=_d_{h.name}"

    signature = ", ".join(["self", "params", *map(parameter, positional), "*", *map(parameter, keyword), *OPTIONS])
    defaults = ", ".join([f"{h.name}={h.name}" for h in spec.hyper] + [f"{k}={v!r}" for k, v in spec.fixed.items()])
    options = ", ".join(f"{o.split('=')[0]}={o.split('=')[0]}" for o in OPTIONS)
    source = (f"def __init__({signature}):\n"
              f"    Optimizer.__init__(self, params, dict({defaults}), {options})\n")
    namespace = {"Optimizer": Optimizer, **{f"_d_{h.name}": h.default for h in spec.hyper}}
    exec(source, namespace)  # noqa: S102 - generated from the spec, as dataclasses does
    init = namespace["__init__"]
    init.__qualname__ = f"{spec.title}.__init__"
    init.__module__ = module
    cls = type(spec.title, (Optimizer,), {"spec": spec, "__init__": init, "__module__": module,
                                          "__doc__": class_doc(spec)})
    return cls


def class_doc(spec):
    """The class docstring: what it is, its hyperparameters and its state."""
    peer = f", as ``torch.optim.{spec.torch}``" if spec.torch else ""
    lines = [f"{spec.summary[0].upper()}{spec.summary[1:]}{peer}.", "",
             f"Equations, conventions and references: :func:`fastdescent.{spec.face_name}`. The keyword",
             "options shared by every optimizer (``flat``, ``clip_grad_norm``, ``clip_grad_value``,",
             "``skip_nonfinite``, ``backend``, ``n_threads``, ``state_dtype``, ``rounding``, ``seed``,",
             "``master_weights``) are described in",
             ":class:`fastdescent.optim.Optimizer`.", "", "Parameters", "----------",
             "params : list of ndarray, or list of dict",
             "    The parameters, or parameter groups (dicts with ``'params'`` and any",
             "    hyperparameters that differ from the defaults below)."]
    for h in spec.hyper:
        lines += [f"{h.name} : {h.type}", f"    {h.doc}"]
    state = ["step"] if spec.counts_steps else []  # (every rule counts with stochastic rounding)
    state += [s.name for s in spec.scalar_state]
    for b in spec.buffers:
        state.append(f"{b.name}" + (f" (if {b.when.text})" if b.when else ""))
    lines += ["", "Notes", "-----", "State per parameter (PyTorch's names, only what the configuration needs): "
              + ", ".join(f"``{s}``" for s in state) + "."]
    return "\n".join(("    " + line if line and i else line) for i, line in enumerate(lines))
