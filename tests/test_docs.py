"""The documentation's generated API pages cover every public name."""

import importlib
import inspect
import sys
from pathlib import Path

import pytest

import fastdescent

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
api_pages = importlib.import_module("api_pages")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    api_pages.write_pages(out)
    return {p.stem: p.read_text() for p in out.glob("*.rst")}


def test_every_top_level_name_has_an_entry(pages):
    top = pages["fastdescent"]
    for name in fastdescent.__all__:
        obj = getattr(fastdescent, name)
        if inspect.ismodule(obj):
            assert f":mod:`{obj.__name__}`" in top, name
        else:
            assert f":: fastdescent.{name}\n" in top, name


def test_every_public_module_with_all_gets_a_page_naming_each_entry(pages):
    for name, module, missing in api_pages.public_modules():
        assert name in pages, name
        if module is None:
            continue
        for attr in module.__all__:
            assert f"{name}.{attr}" in pages[name] or f"``{attr}``: :obj:" in pages[name] \
                or inspect.ismodule(getattr(module, attr)), (name, attr)
    assert "fastdescent.schedules" in pages and "fastdescent.demo.mlp" in pages
    assert not any(part.startswith("_") for page in pages for part in page.split("."))


def test_each_object_is_documented_once(pages):
    entries = [line.split()[-1] for text in pages.values() for line in text.splitlines()
               if line.startswith((".. autofunction::", ".. autoclass::"))]
    objects = {}
    for qualified in entries:
        module, _, attr = qualified.rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
        assert id(obj) not in objects, (qualified, objects.get(id(obj)))
        objects[id(obj)] = qualified


def test_the_site_shows_the_readme_commands():
    pytest.importorskip("sphinx")
    readme_command = importlib.import_module("readme_command").readme_command
    assert readme_command("main-command").endswith("-m fastdescent demo")
    assert readme_command("test-command").endswith("-m pytest")
