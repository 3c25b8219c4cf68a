"""Envelopes back into ``LogRecord``s, and which handlers of the logger tree a record reaches."""

from __future__ import annotations

import logging
from typing import Any

OFFSET_ATTR = "ranklog_offset"


def build_record(envelope: dict[str, Any], offset: int) -> logging.LogRecord:
    """The LogRecord a rank logged, with its origin as attributes.

    ``offset`` is where the record ends in the journal: backends use it to know what they
    already wrote.
    """
    record = logging.LogRecord(
        envelope["logger"], envelope["level"], "", 0, envelope["msg"], None, None
    )
    record.__dict__.update(envelope["extra"])
    record.created = envelope["time"]
    record.msecs = (record.created - int(record.created)) * 1000
    record.process = envelope["pid"]
    record.step = envelope["step"]
    record.hparams = envelope["hparams"]
    record.rank = envelope["rank"]
    record.local_rank = envelope["local_rank"]
    record.world_size = envelope["world_size"]
    record.host = envelope["host"]
    record.run_id = envelope["run"]
    setattr(record, OFFSET_ATTR, offset)
    return record


def dispatch(record: logging.LogRecord) -> None:
    """Hand a record to the collector's logger tree, as if it had been logged here."""
    logging.getLogger(record.name).handle(record)


def reaches(handler: logging.Handler, record: logging.LogRecord) -> bool:
    """Would :func:`dispatch` give ``record`` to ``handler``? (Same walk as ``callHandlers``.)"""
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
