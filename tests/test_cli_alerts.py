"""``revisit alerts``: webhooks added, listed, paused and removed; alerts listed and shown.

The commands run in-process (``revisit.cli.main``) against a real PostGIS: the
subprocess path of the command line is covered by tests/test_cli.py and by
tests/daemon/test_alerts_kill.py, which runs ``revisit alerts deliver``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from revisit.cli import main
from revisit.cli._common import stdout
from tests.daemon.alert_receiver import SECRET, flip, watched_area


@pytest.fixture
def run(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., tuple[int, str, str]]:
    for name in list(os.environ):
        if name.startswith("REVISIT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REVISIT_DATABASE_URL", database_url)
    monkeypatch.setenv("REVISIT_DATA_DIR", str(tmp_path / "var"))
    # Wide enough for whole URLs in the tables, terminal or not.
    monkeypatch.setattr(stdout, "width", 250)
    # The commands would configure the process's logging; the test's stays as it is.
    monkeypatch.setattr("revisit.cli._common.configure_logging", lambda **_: None)

    def invoke(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def test_alerts_commands(
    run: Callable[..., tuple[int, str, str]], engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoke = run
    _, ids = watched_area(engine, url="http://127.0.0.1:9/first", locations=2)

    code, out, err = invoke("alerts", "add", "nowhere", "--url", "http://127.0.0.1:9/x")
    assert code == 1 and "no AOI named 'nowhere' (known: watched)" in err
    code, out, err = invoke("alerts", "add", "watched", "--url", "ftp://example.org/x")
    assert code == 2 and "http:// or https://" in err
    code, out, err = invoke("alerts", "add", "watched", "--url", "https://example.org/hook?t=1")
    assert code == 0 and "webhook #2 for AOI watched: https://example.org/hook?t=1" in out
    assert "alerts.webhook_secret is not set" in err  # said at once, not only when nothing comes
    code, out, err = invoke("alerts", "add", "watched", "--url", "https://example.org/hook?t=1")
    assert code == 1 and "has this webhook already (#2)" in err

    flip(engine, ids, changed=True, updates=1)
    code, out, _ = invoke("alerts", "list")
    assert code == 0 and "https://example.org/hook?t=1" in out and "active" in out
    assert "2 webhooks" in out
    code, out, _ = invoke("alerts", "recent", "--format", "json")
    recent = json.loads(out)
    assert [a["location_id"] for a in recent] == ids[::-1]  # newest first
    assert recent[0]["aois"][0]["name"] == "watched" and recent[0]["changed"] is True
    code, out, _ = invoke("alerts", "recent", "--aoi", "watched", "--limit", "1")
    assert code == 0 and "1 alerts" in out and "changed" in out
    alert_id = recent[0]["alert_id"]
    code, out, _ = invoke("alerts", "show", str(alert_id))
    assert code == 0 and f"revisit-{alert_id}-1" in out and f"revisit-{alert_id}-2" in out
    assert "pending" in out
    code, out, _ = invoke("alerts", "show", str(alert_id), "--format", "json")
    shown = json.loads(out)
    assert [d["status"] for d in shown["deliveries"]] == ["pending", "pending"]
    code, _, err = invoke("alerts", "show", "999")
    assert code == 1 and "no alert #999" in err

    # Without a secret `alerts deliver` refuses (a bad setting: exit 2); paused, a webhook waits.
    code, _, err = invoke("alerts", "deliver")
    assert code == 2 and "REVISIT_ALERTS__WEBHOOK_SECRET" in err
    assert invoke("alerts", "pause", "1")[0] == 0
    monkeypatch.setenv("REVISIT_ALERTS__WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("REVISIT_ALERTS__TIMEOUT_S", "1")
    assert invoke("alerts", "remove", "2")[1] == "webhook #2 removed\n"
    code, out, _ = invoke("alerts", "deliver")
    assert code == 0 and out.startswith("0 delivered, 0 failed attempts, 0 given up, 2 pending")
    code, out, _ = invoke("alerts", "list")
    assert "paused" in out and "1 webhooks" in out
    assert invoke("alerts", "resume", "1")[0] == 0
    code, _, err = invoke("alerts", "remove", "2")
    assert code == 1 and "no webhook #2" in err
