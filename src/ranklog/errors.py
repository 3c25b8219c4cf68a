"""Exceptions, in a module of their own so nothing imports in a circle."""

from __future__ import annotations


class RanklogError(Exception):
    """Base class for ranklog's errors."""


class ProtocolError(RanklogError):
    """A frame that is not a valid ranklog envelope.

    ``reason`` is a short, stable key (``"not-msgpack"``, ``"bad-version"``, ...) that the
    collector counts rejections by; the message says what was expected and what arrived.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConfigError(RanklogError, ValueError):
    """A collector or handler configuration that cannot work.

    Also a ``ValueError``: the rank side raised ``ValueError`` for bad CURVE keys before it
    raised this, and code that catches ``ValueError`` for a bad argument keeps working.
    """
