"""Whether this process is one rank of a multi-process launch: read from the environment alone.

Apart from :mod:`revisit.learner.distributed` (which imports torch) so that
``revisit learn`` can ask before the seconds that torch takes to import.
"""

from __future__ import annotations

import os

#: Environment variables a rank of a torchrun (or hand-made) launch has.
RANK_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process is one rank of a multi-process launch (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False
