"""Stable seeding: every random draw of the simulated world comes from a hash of its inputs.

Python's ``hash()`` is salted per process, so the world uses BLAKE2b over a
canonical text form of the inputs instead. Floats are rounded to 1e-6 degrees
(about 0.1 m) so that a location read back from the database hashes the same.
"""

from __future__ import annotations

import hashlib
from datetime import date

import numpy as np


def _canonical(part: object) -> str:
    if isinstance(part, bool):
        return "1" if part else "0"
    if isinstance(part, float):
        text = f"{part:.6f}"
        return "0.000000" if text == "-0.000000" else text
    if isinstance(part, date):
        return part.isoformat()
    return str(part)


def stable_seed(*parts: object) -> int:
    """A 128-bit integer that depends only on ``parts`` (never on the process).

    Args:
        *parts: Strings, ints, floats (rounded to 6 decimals) or dates.

    Returns:
        A non-negative integer suitable for :func:`numpy.random.default_rng`.
    """
    text = "|".join(_canonical(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(digest, "little")


def rng_for(*parts: object) -> np.random.Generator:
    """A numpy generator seeded from :func:`stable_seed` of ``parts``.

    Args:
        *parts: What the draws depend on; put a purpose tag first (``"profile"``,
            ``"chip"``) so that two uses of the same coordinates never share a stream.
    """
    return np.random.default_rng(stable_seed(*parts))


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``parts``."""
    return (stable_seed(*parts) >> 75) / float(1 << 53)
