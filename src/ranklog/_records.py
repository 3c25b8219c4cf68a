"""Envelopes back into ``LogRecord``s, and which handlers of the logger tree a record reaches."""

from __future__ import annotations

import logging
import time
from typing import Any

OFFSET_ATTR = "ranklog_offset"


# Every attribute LogRecord.__init__ sets, as it sets them for a record with no source
# location; build_record fills in the rest. Copying this is a third of __init__'s cost.
_TEMPLATE = logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
_START = getattr(logging, "_startTime", time.time())


def build_record(envelope: dict[str, Any], offset: int) -> logging.LogRecord:
    """The LogRecord a rank logged, with its origin as attributes.

    ``offset`` is where the record ends in the journal: backends use it to know what they
    already wrote.
    """
    record = logging.LogRecord.__new__(logging.LogRecord)
    attrs = record.__dict__
    attrs.update(_TEMPLATE)
    attrs.update(envelope["extra"])
    level = envelope["level"]
    created = envelope["time"]
    attrs.update(
        name=envelope["logger"],
        msg=envelope["msg"],
        levelno=level,
        levelname=logging.getLevelName(level),
        created=created,
        msecs=(created - int(created)) * 1000,
        relativeCreated=(created - _START) * 1000,
        process=envelope["pid"],
        step=envelope["step"],
        hparams=envelope["hparams"],
        rank=envelope["rank"],
        local_rank=envelope["local_rank"],
        world_size=envelope["world_size"],
        host=envelope["host"],
        run_id=envelope["run"],
    )
    attrs[OFFSET_ATTR] = offset
    return record


def reaches(handler: logging.Handler, record: logging.LogRecord) -> bool:
    """Would ``handler`` get ``record`` logged on ``record.name``? (``callHandlers``' walk.)"""
    logger: logging.Logger | None = logging.getLogger(record.name)
    assert logger is not None
    if logger.disabled or not logger.filter(record):
        return False
    while logger is not None:
        if handler in logger.handlers:
            return record.levelno >= handler.level
        if not logger.propagate:
            return False
        logger = logger.parent
    return False
