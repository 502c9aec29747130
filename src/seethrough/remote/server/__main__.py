"""``python -m seethrough.remote.server --model NAME=PATH ...`` (same as ``seethrough serve``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m seethrough.remote.server"))
