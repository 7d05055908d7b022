"""``python -m hlbd_fast ...``: the ``hlbd-fast`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
