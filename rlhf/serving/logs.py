"""Structured logging: one JSON object per line (or plain text for humans).

stdlib `logging` stays the front end — every `log.info("...", extra={...})` call works as
it always has — and structlog's ProcessorFormatter renders the records: the extra fields
become keys of the line. A structlog logger (`structlog.get_logger()`) writes the same
lines through the same handler. The shape of a line:

    {"ts": "2026-01-01T12:00:00.123Z", "level": "INFO", "service": "learner",
     "logger": "rlhf.learner.loop", "msg": "step", <extra keys>, "exc": "<traceback>"}
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog

# keys of the event dict that are not fields of the line
_INTERNAL = {"_record", "_from_structlog", "message", "asctime", "exc_info", "stack_info", "exception"}


def _shape(service: str) -> structlog.types.Processor:
    """The line's fixed keys first (from the log record), then the extra fields."""

    def shape(logger: Any, method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        record: logging.LogRecord = event["_record"]
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": service,
            "logger": record.name,
            "msg": event.get("event"),
        }
        out.update({k: v for k, v in event.items() if k not in _INTERNAL and k not in out and k != "event"})
        if "exception" in event:
            out["exc"] = event["exception"]
        return out

    return shape


def json_formatter(service: str) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        # records from stdlib loggers: their `extra` fields join the event dict
        foreign_pre_chain=[structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.processors.format_exc_info,
            _shape(service),
            structlog.processors.JSONRenderer(default=str),
        ],
    )


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(json_formatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # structlog's own loggers hand their events to stdlib logging, so they reach this handler
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # kafka-python is chatty at INFO about every connection
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    return logging.getLogger(service)
