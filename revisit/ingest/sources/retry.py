"""The one retry policy of revisit's HTTP sources (Sentinel Hub, STAC).

Both sources wait the same way before trying a call again; see
:class:`RetryPolicy` for which failures are retried and how long each wait is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class RetrySettings(Protocol):
    """What a source's settings section gives the policy."""

    @property
    def max_retries(self) -> int: ...
    @property
    def backoff_s(self) -> float: ...
    @property
    def max_backoff_s(self) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying an HTTP call again.

    Every call gets at most ``max_retries`` retries, shared by all transient
    causes:

    - 429: wait what ``Retry-After`` says (Sentinel Hub sends *milliseconds*,
      unlike RFC 9110's seconds: the value is multiplied by ``retry_after_unit_s``;
      fractions and 0 are accepted), capped at ``max_backoff_s``; without a
      usable header, the exponential back-off below;
    - 5xx, 403 (Sentinel Hub's "quota exceeded"), connection errors, resets and
      timeouts: ``backoff_s * 2**n`` for the n-th retry (0-based), capped at
      ``max_backoff_s``;
    - 401: the token is dropped and a new one fetched, once per call; this does
      not use up a retry. A second 401 is a transient failure like a 5xx.

    Nothing else is retried.

    Attributes:
        max_retries: Retries after the first attempt.
        backoff_s: First back-off delay, seconds.
        max_backoff_s: Longest delay, seconds.
        retry_after_unit_s: Seconds per unit of ``Retry-After`` (0.001: milliseconds).
        sleep: How to wait; tests pass a recorder.
    """

    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    retry_after_unit_s: float = 0.001
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        """The policy of a source's settings (max_retries, backoff_s, max_backoff_s)."""
        return cls(
            max_retries=settings.max_retries,
            backoff_s=settings.backoff_s,
            max_backoff_s=settings.max_backoff_s,
        )

    def backoff(self, retry: int) -> float:
        """The delay before retry number ``retry`` (0-based) of a 5xx or network error."""
        return min(self.backoff_s * 2.0**retry, self.max_backoff_s)

    def retry_after(self, header: str | None, retry: int) -> float:
        """The delay before retry number ``retry`` after a 429 with this ``Retry-After``."""
        if header is not None:
            try:
                value = float(header.strip())
            except ValueError:
                value = math.nan
            if math.isfinite(value) and value >= 0:
                return min(value * self.retry_after_unit_s, self.max_backoff_s)
        return self.backoff(retry)
