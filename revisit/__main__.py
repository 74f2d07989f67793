"""``python -m revisit``: the command line (what ``torchrun … -m revisit learn`` starts)."""

import sys

from revisit.cli import main

sys.exit(main())
