"""The page and its files: served from inside the package, with the right types, never beyond it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from revisit.daemon.health import HealthServer
from revisit.daemon.metrics import Metrics
from revisit.web.static import read_static, static_root
from tests.web.conftest import request

VENDOR = Path(str(static_root())) / "vendor" / "leaflet"


@pytest.fixture(scope="module")
def server() -> Iterator[HealthServer]:
    """No database: the page and its files need none."""
    with HealthServer(port=0, metrics=Metrics(), readiness=lambda: (True, {})) as running:
        yield running


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/index.html", "text/html; charset=utf-8"),
        ("/static/map.js", "text/javascript; charset=utf-8"),
        ("/static/map.css", "text/css; charset=utf-8"),
        ("/static/favicon.svg", "image/svg+xml"),
        ("/static/vendor/leaflet/leaflet.js", "text/javascript; charset=utf-8"),
        ("/static/vendor/leaflet/leaflet.css", "text/css; charset=utf-8"),
        ("/static/vendor/leaflet/images/layers.png", "image/png"),
        ("/static/vendor/leaflet/LICENSE", "text/plain; charset=utf-8"),
    ],
)
def test_files_are_served_with_their_content_type(
    server: HealthServer, path: str, content_type: str
) -> None:
    reply = request(server.url, path)
    assert reply.status == 200 and reply.content_type == content_type
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert int(reply.headers["content-length"]) == len(reply.body) > 0


def test_the_page_loads_nothing_from_elsewhere(server: HealthServer) -> None:
    reply = request(server.url, "/")
    csp = reply.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    page = reply.body.decode()
    # Every script and style sheet the page names is one of ours, and is served.
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert not ref.startswith(("http:", "https:", "//")), ref
        assert request(server.url, "/" + ref).status == 200, ref


def test_leaflet_is_vendored_with_its_license() -> None:
    assert "Leaflet 1.9.4" in (VENDOR / "leaflet.js").read_text()[:200]
    assert "BSD 2-Clause" in (VENDOR / "LICENSE").read_text()


@pytest.mark.parametrize(
    "path",
    [
        "/static/../web/api.py",
        "/static/..%2fapi.py",
        "/static/%2e%2e/api.py",
        "/static/vendor/leaflet/../../../api.py",
        "/static/vendor/../../static.py",
        "/static//etc/passwd",
        "/static/.hidden",
        "/static/vendor\\leaflet\\leaflet.js",
        "/static/",
        "/static/vendor",
        "/static/nothing.js",
        "/static/map.js.exe",
    ],
)
def test_nothing_beyond_the_static_files_is_served(server: HealthServer, path: str) -> None:
    reply = request(server.url, path)
    assert reply.status == 404 and "error" in reply.json()


def test_read_static_stays_inside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "static"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.js").write_text("ok")
    (tmp_path / "secret.txt").write_text("no")
    found = read_static("sub/a.js", root=root)
    assert found is not None and found.body == b"ok"
    for bad in ("../secret.txt", "sub/../../secret.txt", "/secret.txt", "sub//a.js", ""):
        assert read_static(bad, root=root) is None, bad
