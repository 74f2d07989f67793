"""What every command of the ``revisit`` command line shares.

The settings of one invocation (built once, on first use), the console the
results are printed to, the exit statuses, and the parsers of the option values
more than one command takes: durations, dates and bounding boxes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import typer
from rich.console import Console

from revisit.config import Settings, load_settings
from revisit.logs import configure_logging

EXIT_ERROR = 1
EXIT_USAGE = 2

stdout = Console(soft_wrap=True)


@dataclass
class State:
    """The root command's context object: the ``--config`` file and the settings it gave."""

    config_file: Path | None = None
    settings: Settings | None = field(default=None, repr=False)


def get_settings(ctx: typer.Context) -> Settings:
    """The settings of this invocation, loaded (and logging configured) on the first call.

    Args:
        ctx: Any command's context; the settings live on the root's.

    Returns:
        The settings from ``--config`` and the ``REVISIT_*`` environment.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    state: State = ctx.find_root().obj
    if state.settings is None:
        state.settings = load_settings(state.config_file)
        configure_logging(level=state.settings.log_level, fmt=state.settings.log_format)
    return state.settings


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, allow_zero: bool = False) -> float:
    """``90``, ``90s``, ``10m``, ``2h`` or ``1d`` in seconds.

    Args:
        text: The duration.
        allow_zero: Accept ``0`` (``0s``, ...) too.

    Raises:
        typer.BadParameter: The text is not such a duration, or is zero when
            that is not allowed.
    """
    match = _DURATION.match(text)
    if match is None or (float(match.group(1)) <= 0 and not allow_zero):
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 10m or 2h")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def parse_date(text: str | None, *, end_of_day: bool = False) -> datetime | None:
    """``2024-05-01`` or an ISO timestamp, as UTC.

    Args:
        text: The date or timestamp; None passes through.
        end_of_day: A bare date means its last microsecond, not its first.

    Raises:
        typer.BadParameter: The text is neither.
    """
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date like 2024-05-01") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
        if end_of_day and len(text) == 10:
            value += timedelta(days=1) - timedelta(microseconds=1)
    return value.astimezone(UTC)


def bbox_option(text: str) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a ``--bbox`` value; a usage error if it is not one.

    Raises:
        typer.BadParameter: The text is not ``minlon,minlat,maxlon,maxlat``.
    """
    from revisit.ingest.areas import parse_bbox

    try:
        west, south, east, north = parse_bbox(text).bounds
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--bbox") from None
    return (west, south, east, north)
