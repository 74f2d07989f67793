"""``python -m revisit.cli``: the command line (how the service starts its workers)."""

import sys

from revisit.cli import main

sys.exit(main())
