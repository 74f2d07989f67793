"""The web map in a real browser: headless Chromium loads ``/`` from the service's server.

It checks what a user would see: every location drawn, no error in the console,
nothing fetched from outside this server (the map works offline), and a click
on a location plotting its history. The screenshot lands in
var/test-artifacts/web-map.png for a person to look at.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import pytest

from revisit.daemon.health import HealthServer
from tests.conftest import REPO
from tests.web.browser import CHROMIUM, Browser, chromium
from tests.web.conftest import World

pytestmark = [
    pytest.mark.skipif(
        chromium() is None,
        reason=f"{CHROMIUM} is not installed (scripts/ensure-chromium.sh installs it)",
    ),
    pytest.mark.timeout(90),
]

SCREENSHOT = REPO / "var" / "test-artifacts" / "web-map.png"


@pytest.fixture
def browser() -> Iterator[Browser]:
    with Browser(width=1280, height=800) as running:
        for domain in ("Runtime", "Log", "Page", "Network"):
            running.send(f"{domain}.enable")
        running.send(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=800,
            deviceScaleFactor=1,
            mobile=False,
        )
        yield running


def _point_of(browser: Browser, lon: float, lat: float) -> tuple[float, float]:
    """Where on the screen the map draws (lon, lat)."""
    x, y = browser.evaluate(
        "(function () {"
        f" var p = revisitMap.map.latLngToContainerPoint([{lat}, {lon}]);"
        " var box = document.getElementById('map').getBoundingClientRect();"
        " return [p.x + box.left, p.y + box.top]; })()"
    )
    return float(x), float(y)


def _save_screenshot(browser: Browser) -> None:
    shot = browser.send("Page.captureScreenshot", format="png")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    partial = SCREENSHOT.with_name(SCREENSHOT.name + f".{os.getpid()}.tmp")
    partial.write_bytes(base64.b64decode(shot["data"]))
    partial.replace(SCREENSHOT)


def test_the_map_draws_every_location_and_plots_a_history_on_click(
    server: HealthServer, world: World, browser: Browser
) -> None:
    browser.send("Page.navigate", url=server.url + "/")
    state = "document.body.dataset.state + ' ' + document.body.dataset.locations"
    browser.wait_for(f"document.body && document.body.dataset.state === 'ready' && ({state})")
    assert browser.evaluate(state) == f"ready {len(world.places)}"
    assert browser.evaluate("revisitMap.drawn") == len(world.places)
    assert browser.problems() == []
    # The AOI is listed and outlined, and the view was fitted around it.
    assert "geneva-shore" in browser.evaluate("document.getElementById('aoi-list').textContent")
    assert browser.evaluate("revisitMap.map.getZoom()") >= 10
    # The graticule labels the view in degrees.
    labels = browser.evaluate(
        "Array.from(document.querySelectorAll('.graticule-label')).map(e => e.textContent)"
    )
    assert any(t.endswith("°N") for t in labels) and any(t.endswith("°E") for t in labels)

    place = next(p for p in world.places.values() if p.changed and p.steps > 1)
    x, y = _point_of(browser, place.lon, place.lat)
    browser.click(x, y)
    browser.wait_for(f"document.body.dataset.history === '{place.id}'")
    assert browser.evaluate("document.getElementById('history').hidden") is False
    assert browser.evaluate("document.getElementById('history-title').textContent") == (
        f"Location {place.id}"
    )
    measured = "document.querySelectorAll('#plot svg circle.R').length"
    assert browser.evaluate(measured) == place.steps
    assert browser.evaluate("document.querySelectorAll('#plot svg polyline.r').length") == 1
    facts = browser.evaluate("document.getElementById('history-facts').textContent")
    assert f"{place.ratio_ema:.3f}" in facts and "yes, since" in facts
    _save_screenshot(browser)
    browser.evaluate("document.querySelector('input[name=x-axis][value=time]').click()")
    assert browser.evaluate(measured) == place.steps

    browser.evaluate("document.getElementById('changed-only').click()")
    changed = sum(p.changed for p in world.places.values())
    browser.wait_for(f"document.body.dataset.locations === '{changed}'")
    assert browser.wait_for("document.body.dataset.state === 'ready'")

    requested = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e["method"] == "Network.requestWillBeSent"
    ]
    assert requested and all(u.startswith(server.url + "/") for u in requested), requested
    assert browser.problems() == [], json.dumps(browser.problems(), indent=1)
    assert SCREENSHOT.stat().st_size > 10_000
