"""``SceneSource``: the one interface for where imagery comes from.

A source finds products (:meth:`SceneSource.search`) and cuts chips out of one
(:meth:`SceneSource.read`). It never touches the database: the ingest pipeline
stores scenes, chips and quarantine rows, and moves the cursor.

Error contract, which the pipeline relies on:

- a problem with one location's chip: ``read`` *yields* a
  :class:`~revisit.types.Rejection` for it and goes on with the others;
- a problem with the whole product (corrupt, no metadata, not what it claims):
  ``search`` skips it by yielding nothing for it and reporting it through
  ``rejected`` (see :meth:`SceneSource.search`), or ``read`` raises
  :class:`~revisit.errors.SceneRejectedError`;
- a problem that may go away (network, 429, 5xx): raise
  :class:`~revisit.errors.SourceUnavailableError` (a ``TransientError``); the
  pipeline stops the run without moving the cursor past that scene.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

from shapely.geometry.base import BaseGeometry

from revisit.types import Chip, LocationRef, Rejection, SceneRef

#: Called by ``search`` for a product it found but could not describe: (ref, reason, detail).
OnRejected = Callable[[str, str, str], None]


class SceneSource(abc.ABC):
    """Where imagery comes from: ``simulated``, ``local`` or ``sentinelhub``."""

    #: The name stored in ``scene.source`` and ``ingest_cursor.source``.
    name: str

    @abc.abstractmethod
    def search(
        self,
        *,
        since: datetime | None,
        until: datetime,
        area: BaseGeometry,
        on_rejected: OnRejected,
    ) -> Iterator[SceneRef]:
        """Products acquired in ``[since, until]`` that intersect ``area``, oldest first.

        Args:
            since: Earliest acquisition time (inclusive); None: as far back as the
                source goes.
            until: Latest acquisition time (inclusive).
            area: Where revisit has locations, lon/lat: an AOI polygon or the
                locations' points. A product that intersects no part of it is skipped.
            on_rejected: Called for each product found but unusable (no date,
                no metadata, a corrupt header), with a product reference, a reason
                code and a one-line detail; the search goes on.

        Yields:
            Scene references in ascending ``acquired_at``.

        Raises:
            SourceUnavailableError: The source did not answer; try again later.
        """

    @abc.abstractmethod
    def read(self, scene: SceneRef, locations: Sequence[LocationRef]) -> Iterator[Chip | Rejection]:
        """The chips of ``locations`` in ``scene``, each on its location's grid.

        Every location gets exactly one Chip or one Rejection. Chips are uint16
        DN in canonical band order with any processing-baseline offset removed,
        and carry their valid and cloud fractions.

        Raises:
            SceneRejectedError: The product as a whole is bad input.
            SourceUnavailableError: The source did not answer; try again later.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release what the source holds (HTTP sessions, open files)."""
