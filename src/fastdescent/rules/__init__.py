"""The update rules: one spec per rule, and the functional faces derived from them.

Each module ``<rule>.py`` of this package declares its rule(s) as
:class:`~fastdescent.rules._spec.RuleSpec` objects; they are found here, so that a
new rule is one new module (plus its kernel and reference twin). ``SPECS`` lists
them (name -> spec, in the order of their papers); each spec's functional face
(``<name>_step``) is generated and exported from this package.
"""

import importlib
import pkgutil

from ._spec import RuleSpec, make_face
from .averaging import ema_update, swa_update, swap_arrays


def _find_specs():
    specs = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, RuleSpec):
                if value.name in specs and specs[value.name] is not value:
                    raise ImportError(f"two rules are named {value.name!r}")
                specs[value.name] = value
    return dict(sorted(specs.items(), key=lambda item: (item[1].year, item[0])))


#: Every rule: name -> RuleSpec.
SPECS = _find_specs()
#: Every functional face: ``<name>_step`` -> function.
FACES = {spec.face_name: make_face(spec, __name__) for spec in SPECS.values()}
globals().update(FACES)

__all__ = [*FACES, "ema_update", "swa_update", "swap_arrays"]
