"""The speed-up plan's table, measured: ``python benchmarks/seed_table.py --help`` (same as ``hlbd-fast bench``)."""

import sys

from hlbd_fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
