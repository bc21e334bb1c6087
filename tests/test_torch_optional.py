"""PyTorch stays optional: ``import fastdescent`` never imports it, and
``import fastdescent.torch`` without it says how to install it."""

import os
import subprocess
import sys
from pathlib import Path

import fastdescent


def run_python(code):
    env = dict(os.environ)
    package_root = str(Path(fastdescent.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_fastdescent_does_not_import_torch():
    result = run_python("import sys, fastdescent; fastdescent.show_config(); print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("False")


def test_import_fastdescent_torch_without_torch_says_how_to_install_it():
    # sys.modules["torch"] = None makes ``import torch`` fail as if it were absent.
    result = run_python(
        "import sys; sys.modules['torch'] = None\n"
        "try:\n"
        "    import fastdescent.torch\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install torch" in result.stdout
