"""``python -m fastdescent.demo``: the same as ``python -m fastdescent demo``."""

import sys

from ..__main__ import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
