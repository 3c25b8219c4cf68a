"""Endpoint addresses as both sides read them: the variable that names one, which are
local-only, and what a collector binds to be reached at one."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

ENDPOINT_ENV = "RANKLOG_ENDPOINT"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def bind_address_for(endpoint: str) -> str:
    """What the collector binds so that ranks connecting to ``endpoint`` reach it: the one
    interface address ``endpoint``'s host names (ZeroMQ binds addresses, not host names),
    never every interface."""
    parts = urlsplit(endpoint)
    if parts.scheme == "tcp" and parts.hostname and parts.hostname not in _LOOPBACK_HOSTS:
        try:
            address = socket.gethostbyname(parts.hostname)
        except OSError:
            return endpoint  # the bind then fails and says which address
        return f"tcp://{address}:{parts.port}"
    return endpoint


def is_local_only(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and TCP on a loopback address."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    return parts.scheme == "tcp" and parts.hostname in _LOOPBACK_HOSTS
