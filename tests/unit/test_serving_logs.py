"""The JSON log lines (rlhf/serving/logs.py, structlog's ProcessorFormatter under stdlib logging)."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from rlhf.serving.logs import setup_logging


@pytest.fixture
def logging_to_stderr():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    structlog.reset_defaults()


def start(capsys):
    """JSON logging onto the test's stderr (set up inside the test: capsys swaps the
    stream between a fixture's setup and the test's call), and a reader of its lines."""
    setup_logging("svc", level="INFO")
    return lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_a_stdlib_record_with_extra_fields(capsys, logging_to_stderr):
    lines = start(capsys)
    logging.getLogger("rlhf.x").info("step %d done", 3, extra={"step": 3, "loss": 0.5, "where": object()})
    logging.getLogger("rlhf.x").debug("below the level")
    [line] = lines()
    assert list(line)[:5] == ["ts", "level", "service", "logger", "msg"]
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2026-01-01T12:00:00.123Z")
    assert (line["level"], line["service"], line["logger"], line["msg"]) == ("INFO", "svc", "rlhf.x", "step 3 done")
    assert line["step"] == 3 and line["loss"] == 0.5 and line["where"].startswith("<object")


def test_an_exception_travels_as_exc(capsys, logging_to_stderr):
    lines = start(capsys)
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("rlhf.x").exception("failed", extra={"stage": "score"})
    [line] = lines()
    assert line["level"] == "ERROR" and line["stage"] == "score"
    assert "Traceback" in line["exc"] and "ValueError: bad thing" in line["exc"]


def test_a_structlog_logger_writes_the_same_line(capsys, logging_to_stderr):
    lines = start(capsys)
    structlog.get_logger("rlhf.native").warning("native", step=4)
    [line] = lines()
    assert (line["level"], line["logger"], line["msg"], line["step"]) == ("WARNING", "rlhf.native", "native", 4)
