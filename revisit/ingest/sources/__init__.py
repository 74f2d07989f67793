"""The sources of imagery, and the one place that builds them from Settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from revisit.errors import ConfigError

if TYPE_CHECKING:
    from revisit.config import Settings
    from revisit.ingest.sources.base import SceneSource

SOURCE_NAMES = ("simulated", "local", "sentinelhub", "stac")


def build_source(name: str, settings: Settings, *, path: Path | None = None) -> SceneSource:
    """The source called ``name``, configured from ``settings``.

    Args:
        name: ``simulated``, ``local``, ``sentinelhub`` or ``stac``.
        settings: The validated settings.
        path: For ``local``: the directory of products (overrides ``local.path``).

    Raises:
        ConfigError: An unknown source, or one that lacks what it needs.
    """
    if name == "simulated":
        from revisit.ingest.sources.simulated import SimulatedSource

        return SimulatedSource.from_settings(settings)
    if name == "local":
        from revisit.ingest.sources.local import LocalSource

        root = path or settings.local.path
        if root is None:
            raise ConfigError(
                "the local source needs a directory of products: --path DIR or REVISIT_LOCAL__PATH"
            )
        if not root.is_dir():
            raise ConfigError(f"the local source's directory {root} does not exist")
        return LocalSource(root)
    if name == "sentinelhub":
        from revisit.ingest.sources.sentinelhub import SentinelHubSource

        return SentinelHubSource.from_settings(settings)
    if name == "stac":
        from revisit.ingest.sources.stac import StacSource

        return StacSource.from_settings(settings)
    raise ConfigError(f"unknown source {name!r}: choose one of {', '.join(SOURCE_NAMES)}")
