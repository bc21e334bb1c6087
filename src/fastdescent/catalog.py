"""The catalog: the rule configurations that the CLI, the benchmarks and the asv
suite run, derived from the rule specs (each spec's examples marked ``bench``).

Each entry knows the buffers its rule reads and writes per element, which is
what its speed limit is made of: a step moves ``bytes_per_element`` bytes per
parameter element, and no kernel can beat memory bandwidth divided by that.
"""

from dataclasses import dataclass, field

import numpy as np

from .rules import FACES, SPECS
from .rules._spec import FIRST_GRADIENT, Example, RuleSpec


@dataclass(frozen=True)
class Rule:
    """One configuration of one rule."""

    spec: RuleSpec
    example: Example
    #: The validated hyperparameters of the configuration.
    hyper: dict = field(repr=False)

    @property
    def name(self):
        return self.example.name

    @property
    def description(self):
        return self.example.description

    @property
    def options(self):
        """The hyperparameters this configuration sets (the rest are defaults)."""
        return dict(self.example.options)

    @property
    def state(self):
        """The state buffers it keeps, in the face's order after (params, grads)."""
        return tuple(b.name for b in self.spec.needed(self.hyper))

    @property
    def passes(self):
        """``[(arrays read, arrays written)]`` per element of each memory pass of a step."""
        return self.spec.kernel_passes(self.hyper)

    @property
    def reads(self):
        return self.spec.traffic(self.hyper)[0]

    @property
    def writes(self):
        return self.spec.traffic(self.hyper)[1]

    @property
    def torch_peer(self):
        """``(torch.optim class name, its arguments)`` taking the same branches (the
        learning rate always given), or None (no peer, or an option the peer does
        not have)."""
        if self.spec.torch is None:
            return None
        torch_names = {h.name for h in self.spec.hyper if h.torch}
        if any(k not in torch_names for k in self.options):
            return None
        return self.spec.torch, dict(self.options, lr=self.hyper["lr"])

    def bytes_per_element(self, dtype):
        """Bytes read and written per parameter element by a step (all its passes)."""
        return (self.reads + self.writes) * np.dtype(dtype).itemsize

    def make_state(self, rng, n, dtype):
        """Fresh random state buffers for a parameter of ``n`` elements in the rule's
        sample shape (``spec.sample_shape``), positive or zero where the buffer's
        ``sample`` asks for it; None for a buffer that shape keeps none of."""
        shape = self.spec.sample_shape(n)
        out = []
        for buffer in self.spec.needed(self.hyper):
            buffer_shape = buffer.shape_for(shape)
            if buffer_shape is None:
                out.append(None)
                continue
            a = rng.standard_normal(buffer_shape) * 0.1
            if buffer.sample == "positive":
                a = np.abs(a) + 0.01
            elif buffer.sample == "zero":
                a = np.zeros(buffer_shape)
            out.append(a.astype(dtype))
        return out

    def scalar_state_at(self, t):
        """The scalar states (ASGD's eta and mu...) before step ``t`` (from 1) of this
        configuration: the initial values advanced through steps 1 to t - 1."""
        state = {s.name: s.initial_value(self.hyper) for s in self.spec.scalar_state}
        for step in range(1, t):
            state = self.spec.advanced(self.hyper, step, state)
        return state

    def step(self, params, grads, *state, t, backend=None, n_threads=None, grad_scale=1.0, scalar_state=None,
             **hyper):
        """Step ``t`` (from 1) of the face on ``params`` with ``state`` (in the order of
        :attr:`state`); ``hyper`` overrides hyperparameters of the configuration. At
        ``t == 1`` a buffer that starts as the first gradient is initialised from
        it, as PyTorch does. ``scalar_state`` (name -> value; None: the initial
        values) goes to the face, and the face's result (the scalar states after the
        step, or None) is returned."""
        buffers = dict(zip(self.state, state))
        face_buffers = [buffers.get(b.name) for b in self.spec.buffers]
        extra = {}
        if self.spec.uses_step:
            extra["step"] = t
        if self.spec.may_start_as_gradient:
            extra["first_step"] = t == 1 and any(
                b.initial(self.hyper) is FIRST_GRADIENT for b in self.spec.needed(self.hyper))
        face_options = {h.name for h in self.spec.hyper if h.face}
        options = {k: v for k, v in {**self.options, **hyper}.items() if k in face_options}
        return FACES[self.spec.face_name](params, grads, *face_buffers, **options, **extra, **(scalar_state or {}),
                                          grad_scale=grad_scale, backend=backend, n_threads=n_threads)


def configure(spec, options=None, name=None, description=""):
    """A :class:`Rule` of ``spec`` with ``options`` (any configuration, not only the
    spec's examples)."""
    options = dict(options or {})
    return Rule(spec, Example(name or spec.name, options, description), spec.validate({**spec.defaults, **options}))


def configurations(bench_only=False):
    """Every example of every rule as a :class:`Rule` (``bench_only``: those marked
    for the catalog), by name."""
    return {example.name: Rule(spec, example, spec.validate({**spec.defaults, **example.options}))
            for spec in SPECS.values() for example in spec.examples if example.bench or not bench_only}


#: The catalog: name -> Rule.
RULES = configurations(bench_only=True)
