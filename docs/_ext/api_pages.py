"""Write the API reference pages from the package's ``__all__`` lists, at build time.

Nothing in ``docs/api/`` is written by hand: every public name is found by
importing the package, so a rule, class or subpackage added to the library
appears in the reference on the next build.

* ``api/fastdescent.rst``: every name of ``fastdescent.__all__``, grouped by the
  module that defines it (see ``SECTIONS``);
* ``api/<module>.rst`` for every public module or subpackage (no ``_`` in its
  dotted name) that declares ``__all__``: its names, except those already
  documented on an earlier page, which are linked instead (one entry per object,
  so Sphinx sees no duplicates);
* ``api/index.rst``: the list of those pages.
"""

import importlib
import inspect
import pkgutil
from pathlib import Path

PACKAGE = "fastdescent"

#: top-level names grouped by where they are defined: (module prefix, section title)
SECTIONS = [
    ("fastdescent.rules", "Update rules (functional faces)"),
    ("fastdescent.optim", "Optimizer objects"),
    ("fastdescent.schedules", "Schedules"),
    ("fastdescent.plateau", "Plateaus and early stopping"),
    ("fastdescent.averaging", "Weight averaging"),
    ("fastdescent._config", "Threads and backend"),
    ("fastdescent._info", "Build configuration"),
]
OTHER = "Other"


def public_modules():
    """Dotted names of the package's public modules that declare ``__all__``, the package first."""
    package = importlib.import_module(PACKAGE)
    names = [PACKAGE]
    for info in pkgutil.walk_packages(package.__path__, PACKAGE + ".", onerror=lambda name: None):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        names.append(info.name)
    modules = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as error:  # an optional dependency (PyTorch, mpi4py) is missing
            modules.append((name, None, str(error)))
            continue
        if hasattr(module, "__all__"):
            modules.append((name, module, None))
    return modules


def _kind(obj):
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if callable(obj):
        return "function"
    return "data"


def _directive(qualified, obj):
    kind = _kind(obj)
    if kind in ("class", "exception"):
        return [f".. autoclass:: {qualified}", "   :members:", "   :show-inheritance:", ""]
    if kind == "function":
        return [f".. autofunction:: {qualified}", ""]
    return [f".. autodata:: {qualified}", "   :no-value:", ""]


def _title(text, underline):
    return [text, underline * len(text), ""]


def _section_of(obj):
    module = getattr(obj, "__module__", "") or ""
    for prefix, title in SECTIONS:
        if module == prefix or module.startswith(prefix + "."):
            return title
    return OTHER


def write_pages(out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    documented = {}  # id(obj) -> qualified name of its entry
    pages = []
    for name, module, missing in public_modules():
        lines = _title(f"``{name}``", "=")
        if module is None:
            lines += [f".. py:module:: {name}", "",
                      f"This module could not be imported when the documentation was built ({missing}).", ""]
            pages.append(name)
            (out_dir / f"{name}.rst").write_text("\n".join(lines))
            continue
        lines += [f".. automodule:: {name}", "   :no-members:", ""]
        entries, links, submodules = {}, [], []
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.ismodule(obj):
                submodules.append(obj.__name__)
            elif id(obj) in documented and _kind(obj) != "data":
                links.append((attr, documented[id(obj)]))
            else:
                title = _section_of(obj) if name == PACKAGE else ""
                entries.setdefault(title, []).append((attr, obj))
        order = [title for _, title in SECTIONS] + [OTHER] if name == PACKAGE else [""]
        # short names: the automodule above made this module the current one
        summary = [".. autosummary::", ""] + [f"   {attr}" for title in order
                                              for attr, _ in entries.get(title, [])] + [""]
        if len(summary) > 3:
            lines += summary
        for title in order:
            if title not in entries:
                continue
            if title:
                lines += _title(title, "-")
            for attr, obj in entries[title]:
                qualified = f"{name}.{attr}"
                lines += _directive(qualified, obj)
                documented.setdefault(id(obj), qualified)
        if links or submodules:
            lines += _title("Also here", "-")
            lines += [f"* ``{attr}``: :obj:`{target}`" for attr, target in links]
            lines += [f"* module :mod:`{sub}`" for sub in submodules]
            lines.append("")
        (out_dir / f"{name}.rst").write_text("\n".join(lines))
        pages.append(name)
    index = _title("API reference", "=") + [
        "Generated from the docstrings: one page per public module, with every name of its ``__all__``.",
        "The names users need most are on the first page; the others hold what they add.", "",
        ".. toctree::", "   :maxdepth: 1", "",
    ] + [f"   {page}" for page in pages] + [""]
    (out_dir / "index.rst").write_text("\n".join(index))
    return pages


def _on_builder_inited(app):
    write_pages(Path(app.srcdir) / "api")


def setup(app):
    app.connect("builder-inited", _on_builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
