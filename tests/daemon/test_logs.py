"""Log lines: JSON with time, level, logger, message and ids; readable text on a terminal."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from revisit.logs import configure_logging, log_context


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_the_ids_of_their_context(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(fmt="json")
    log = logging.getLogger("revisit.test")
    with log_context(job="ingest:simulated"):
        log.info("scene ingested", extra={"scene": "S2A_X", "location": 7})
        with log_context(step=12):
            log.warning("step done")
    log.info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [set(line) >= {"time", "level", "logger", "message"} for line in lines] == [True] * 3
    assert lines[0] == {**lines[0], "job": "ingest:simulated", "scene": "S2A_X", "location": 7}
    assert lines[1]["job"] == "ingest:simulated" and lines[1]["step"] == 12
    assert lines[1]["level"] == "warning" and lines[1]["logger"] == "revisit.test"
    assert "job" not in lines[2]


def test_auto_is_text_on_a_terminal_and_json_elsewhere(
    restore_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging(fmt="auto")  # captured standard error is no terminal
    logging.getLogger("revisit.test").info("hello", extra={"job": "learn"})
    assert json.loads(capsys.readouterr().err)["job"] == "learn"

    configure_logging(fmt="text")
    logging.getLogger("revisit.test").info("hello", extra={"job": "learn"})
    line = capsys.readouterr().err.strip()
    assert line.endswith("info    revisit.test: hello  job=learn")
