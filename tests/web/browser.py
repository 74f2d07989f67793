"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for the map's browser test.

:class:`Browser` starts Debian's ``chromium --headless=new`` with a throwaway
profile, finds its debugging port in the profile's ``DevToolsActivePort`` and
opens one page's websocket. :meth:`Browser.send` waits for the answer to a
command; every event that arrives meanwhile is kept in :attr:`Browser.events`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

CHROMIUM = os.environ.get("REVISIT_CHROMIUM", "/usr/bin/chromium")


class CdpError(RuntimeError):
    """Chromium answered a command with an error, or not in time."""


def chromium() -> str | None:
    """The chromium program, or None when it is not installed."""
    found = shutil.which(CHROMIUM)
    return found if found and os.access(found, os.X_OK) else None


class Browser:
    """One headless Chromium with one page, for the length of a ``with`` block.

    Args:
        width, height: The window's size in CSS pixels.
        start_timeout_s: How long to wait for the debugging port.
    """

    def __init__(self, *, width: int = 1280, height: int = 800, start_timeout_s: float = 20):
        program = chromium()
        if program is None:
            raise FileNotFoundError(f"{CHROMIUM} is not installed")
        self.profile = Path(tempfile.mkdtemp(prefix="revisit-chromium-"))
        self._log = (self.profile / "stderr.log").open("wb")
        args = [
            program,
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile / 'profile'}",
            f"--window-size={width},{height}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--mute-audio",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(2, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        # A session of its own: closing ends the renderer and GPU children with it.
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        try:
            port = self._port(start_timeout_s)
            page = self._page_socket(port, start_timeout_s)
            self.ws = websocket.create_connection(page, timeout=30, suppress_origin=True)
        except BaseException:
            self.close()
            raise

    def _port(self, timeout_s: float) -> int:
        marker = self.profile / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CdpError(f"chromium exited with {self.process.returncode}: {self.stderr()}")
            lines = marker.read_text().splitlines() if marker.exists() else []
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
            time.sleep(0.05)
        raise CdpError(f"chromium did not open its debugging port in {timeout_s:g} s")

    def _page_socket(self, port: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            if time.monotonic() > deadline:
                raise CdpError("chromium has no page to drive")
            time.sleep(0.05)

    def stderr(self) -> str:
        self._log.flush()
        text = (self.profile / "stderr.log").read_text(errors="replace")
        return text[-2000:]

    def send(self, method: str, timeout_s: float = 20, **params: Any) -> dict[str, Any]:
        """Send a command and return its result.

        Raises:
            CdpError: Chromium answered with an error, or not within ``timeout_s``.
        """
        self._next_id += 1
        ident = self._next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                message = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if message.get("id") == ident:
                if "error" in message:
                    raise CdpError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            if "method" in message:
                self.events.append(message)
        raise CdpError(f"{method}: no answer within {timeout_s:g} s")

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        """The value of a JavaScript expression in the page.

        Raises:
            CdpError: It threw.
        """
        result = self.send(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=await_promise,
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout_s: float = 15) -> Any:
        """Evaluate ``expression`` until it is truthy; its last value.

        Raises:
            CdpError: It never was within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise CdpError(f"{expression!r} still {value!r} after {timeout_s:g} s")

    def click(self, x: float, y: float) -> None:
        """A left click at viewport coordinates, as a user's mouse makes it."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(
                    f"exception: {details.get('exception', {}).get('description') or details}"
                )
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(
                    "console: "
                    + " ".join(
                        str(a.get("value", a.get("description"))) for a in params.get("args", [])
                    )
                )
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        return found

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # any child it left behind
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
