"""The map's page and files, read from inside the package (``revisit/web/static/``).

Files are looked up by a relative path made only of plain names: no ``..``, no
hidden files, no backslashes or percent escapes, so a request can never leave
the static folder. They are read through :mod:`importlib.resources`, which
also works when the package is installed from a wheel or a zip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

#: The ``Content-Type`` of each file kind the static folder holds; others are not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}
#: Files without a suffix (LICENSE) are text.
PLAIN_TEXT = "text/plain; charset=utf-8"

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class StaticFile:
    """A file to send: its bytes and content type."""

    body: bytes
    content_type: str


def static_root() -> Traversable:
    """The folder of the page and its files inside the installed package."""
    return resources.files("revisit.web").joinpath("static")


def content_type_of(name: str) -> str | None:
    """The ``Content-Type`` for a file name, or None for a kind that is not served."""
    dot = name.rfind(".")
    if dot <= 0:
        return PLAIN_TEXT
    return CONTENT_TYPES.get(name[dot:].lower())


def safe_parts(relative: str) -> list[str] | None:
    """The path segments of ``relative`` (below /static/), or None if it could escape.

    Each segment must be a plain name: letters, digits, ``_``, ``-`` and ``.``,
    not starting with ``.`` (so neither ``..`` nor hidden files), at most 128
    characters; at most 8 segments.
    """
    parts = relative.split("/")
    if not parts or len(parts) > 8:
        return None
    if not all(_SEGMENT.fullmatch(p) and ".." not in p for p in parts):
        return None
    return parts


def read_static(relative: str, *, root: Traversable | None = None) -> StaticFile | None:
    """The file at ``relative`` under the static folder, or None if there is none to serve.

    Args:
        relative: The path below ``/static/``, as sent (not percent-decoded:
            a ``%`` makes it unsafe and so not found).
        root: The folder to serve from (tests); the package's by default.
    """
    parts = safe_parts(relative)
    if parts is None:
        return None
    kind = content_type_of(parts[-1])
    if kind is None:
        return None
    node = root if root is not None else static_root()
    for part in parts:
        node = node.joinpath(part)
    if not node.is_file():
        return None
    return StaticFile(body=node.read_bytes(), content_type=kind)
