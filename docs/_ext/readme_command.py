"""``.. readme-command:: main-command``: the shell command between
``<!-- main-command -->`` markers in README.md, as a code block (the same
extraction as ``.ci/run``, so the site shows exactly the command CI runs)."""

import re
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_command(marker):
    text = README.read_text()
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```\w*\n(.*?)\n```\n<!-- /{re.escape(marker)} -->", text, re.S)
    if match is None:
        raise ValueError(f"README.md has no <!-- {marker} --> block")
    return match.group(1)


class ReadmeCommand(SphinxDirective):
    required_arguments = 1

    def run(self):
        self.env.note_dependency(str(README))
        code = readme_command(self.arguments[0])
        block = nodes.literal_block(code, code, language="bash")
        return [block]


def setup(app):
    app.add_directive("readme-command", ReadmeCommand)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
