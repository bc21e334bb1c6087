"""Sphinx configuration of the fastdescent documentation.

Build (from the repository root, with the ``docs`` extra installed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Nothing is downloaded at build time (no intersphinx, no remote images) nor when
the pages are read (MathJax ships inside the site). The API
pages are generated from ``__all__`` (``_ext/api_pages.py``) and the gallery runs
the scripts in ``examples/`` (sphinx-gallery).
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import fastdescent  # noqa: E402

project = "fastdescent"
author = "fastdescent developers"
copyright = "fastdescent developers"
release = fastdescent.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",           # MathJax copied into the site: formulas render without a network
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "api_pages",
    "readme_command",
]

exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip",
                    "auto_examples/*.md5", "auto_examples/*.json"]
templates_path = []
default_role = "py:obj"

# -- autodoc / numpydoc --------------------------------------------------------
autosummary_generate = False          # the API pages are written by api_pages, not by autosummary
autodoc_typehints = "none"             # the signatures show the hints; numpydoc's Parameters say the rest
autodoc_member_order = "bysource"
autodoc_default_options = {"inherited-members": False}
numpydoc_show_class_members = False    # :members: lists them once, below the class
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- sphinx-gallery --------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(HERE.parent / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",      # run every plot_*.py script
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "matplotlib_animations": False,
    "reference_url": {},                 # no links to remote documentation (nothing downloaded)
    "show_memory": False,
    "abort_on_example_error": True,
    "run_stale_examples": False,
    # FASTDESCENT_DOCS_GALLERY=0: a quick build that does not run the scripts
    "plot_gallery": os.environ.get("FASTDESCENT_DOCS_GALLERY", "1").lower() not in ("0", "false", "no"),
}

# -- HTML ------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"fastdescent {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "secondary_sidebar_items": ["page-toc"],
}
html_sidebars = {"index": [], "getting_started": []}
html_static_path = []
html_show_sourcelink = False


# -- docstrings inherited from PyTorch -------------------------------------------------
def _drop_torch_docstrings(app, what, name, obj, options, lines):
    """fastdescent.torch's classes append their torch.optim base class's docstring,
    written for PyTorch's own Sphinx setup (its labels and markup): link to it instead."""
    if what != "class" or not name.startswith("fastdescent.torch."):
        return
    for base in getattr(obj, "__mro__", ())[1:]:
        module = getattr(base, "__module__", "")
        if module.startswith("torch.optim") and base.__doc__:
            text = "\n".join(lines)
            first = base.__doc__.strip().splitlines()[0].strip()
            cut = text.find(first)
            if cut > 0:
                kept = text[:cut].rstrip().splitlines()
                lines[:] = kept + ["", f"The arguments are those of ``torch.optim.{base.__name__}``; see PyTorch's "
                                   "documentation.", ""]
            return


def setup(app):
    app.connect("autodoc-process-docstring", _drop_torch_docstrings)
