"""A dropped optimizer is freed at once by reference counting (issue 14, defect 5):
nothing in it refers back to it, so it never waits for the cyclic garbage
collector, which a large flat arena could otherwise outlive by gigabytes."""

import gc
import weakref

import numpy as np
import pytest

from test_optim import RULES, make_grads, make_params, take_steps


@pytest.fixture
def gc_disabled():
    # No gc.collect() first: the optimizer under test is freed by reference counts or
    # not at all, whatever older garbage there is (and a full collection with torch
    # imported costs over a second per test).
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "flat"])
@pytest.mark.parametrize("name", list(RULES))
def test_a_dropped_optimizer_is_freed_without_the_cyclic_gc(name, flat, rng, gc_disabled, tmp_path):
    cls, config = RULES[name]
    params = make_params(rng, np.float32, [(7,), (3, 5)], rule=name) + make_params(rng, np.float64, [(4,)], rule=name)
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], **config, flat=flat,
              clip_grad_norm=1.0, skip_nonfinite=True)
    take_steps(opt, config, make_grads(rng, params, 2))
    assert (opt.params[0] in opt.state) == bool(opt.state)  # the parameter-keyed lookup works
    opt.load_state_dict(opt.state_dict())
    opt.save(tmp_path / "c")
    opt.load(tmp_path / "c")
    arena = weakref.ref(opt.params[0].base) if flat else None
    freed = weakref.ref(opt)
    del opt
    assert freed() is None, "the optimizer is kept alive by a reference cycle"
    if flat:
        assert arena() is None, "the flat arena outlived its optimizer"
