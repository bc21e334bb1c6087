# The module is written by setup.py at build time (openmp, compiler, common_flags, variants, machine).
from typing import Any

BUILD_INFO: dict[str, Any]
