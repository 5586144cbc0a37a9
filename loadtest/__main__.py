"""``python -m loadtest``: the same as ``realtime-loadtest``."""

import sys

from loadtest.cli import main

sys.exit(main())
