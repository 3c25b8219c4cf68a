"""Which records of the logger tree a backend handler gets, once it is out of the tree.

A dictConfig attaches the backend handlers to loggers. The records they get come from the
journal, not from logging calls in the backends' process (those are an SDK's own lines), so
:func:`detach_handlers` takes every handler out of the tree and keeps, for each, a
:class:`Route`: the loggers it was attached to and its level. ``Route.reaches`` then answers
what ``Logger.callHandlers`` would have done for a record logged on ``record.name``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable


class Route:
    """Would the handler attached to ``loggers`` (at ``level``) get a record?

    The logger tree is read live (``disabled``, filters, ``propagate``), as logging reads it
    for each record; answers for a logger without filters are cached by (name, level).
    """

    def __init__(self, loggers: Iterable[logging.Logger], level: int = logging.NOTSET) -> None:
        self._attached = {id(logger) for logger in loggers}
        self.level = level
        self._cache: dict[tuple[str, int], bool] = {}

    def reaches(self, record: logging.LogRecord) -> bool:
        """``callHandlers``' walk for ``record``; a logger filter that raises propagates."""
        key = (record.name, record.levelno)
        reached = self._cache.get(key)
        if reached is None:
            origin = logging.getLogger(record.name)
            reached = self._walk(origin, record.levelno, record)
            if not origin.filters:  # else it depends on the record
                self._cache[key] = reached
        return reached

    def reaches_logger(self, name: str, level: int) -> bool | None:
        """:meth:`reaches` for a record logged on ``name`` at ``level``, without the record;
        None if the answer depends on the record (the logger has filters)."""
        reached = self._cache.get((name, level))
        if reached is None:
            origin = logging.getLogger(name)
            if origin.filters:
                return None
            reached = self._cache[(name, level)] = self._walk(origin, level, None)
        return reached

    def _walk(self, origin: logging.Logger, level: int, record: logging.LogRecord | None) -> bool:
        if origin.disabled or (record is not None and not origin.filter(record)):
            return False
        logger: logging.Logger | None = origin
        while logger is not None:
            if id(logger) in self._attached:
                return level >= self.level
            if not logger.propagate:
                return False
            logger = logger.parent
        return False


class _Detached(logging.NullHandler):
    """Where backend handlers were taken off a logger."""


def detach_handlers(
    loggers: Iterable[logging.Logger],
) -> list[tuple[logging.Handler, Route]]:
    """Take every handler off ``loggers``; return each (once) with its route, in the order
    first found. A logger left without handlers gets a :class:`logging.NullHandler`, so an
    SDK's own log lines stay as quiet as when the handlers were there."""
    found: dict[int, tuple[logging.Handler, list[logging.Logger]]] = {}
    for logger in loggers:
        handlers = [h for h in logger.handlers if not isinstance(h, _Detached)]
        if not handlers:
            continue
        for handler in handlers:
            found.setdefault(id(handler), (handler, []))[1].append(logger)
        logger.handlers = [_Detached()]
    return [(handler, Route(attached, handler.level)) for handler, attached in found.values()]
