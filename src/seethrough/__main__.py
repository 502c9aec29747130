"""``python -m seethrough ...``: the same as the ``seethrough`` command (see :mod:`seethrough.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
