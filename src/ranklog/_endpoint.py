"""Where ranks and the collector meet when nobody configured an address."""

from __future__ import annotations

import getpass
import hashlib
import os
import tempfile
from urllib.parse import urlsplit

from ranklog._identity import RankIdentity

ENDPOINT_ENV = "RANKLOG_ENDPOINT"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def derived_endpoint(identity: RankIdentity) -> str:
    """The endpoint every rank of one job computes alike.

    ``RANKLOG_ENDPOINT`` wins. On one node it is an ``ipc://`` path keyed by the run id and
    the launching agent's pid (all local workers of one torchrun share that parent), so two
    jobs on a machine never meet. Across nodes it is TCP on rank 0's host
    (``MASTER_ADDR``), one port above ``MASTER_PORT``.
    """
    configured = os.environ.get(ENDPOINT_ENV)
    if configured:
        return configured
    if identity.local_world_size >= identity.world_size:
        key = f"{identity.run_id}:{os.getppid()}:{getpass.getuser()}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return f"ipc://{tempfile.gettempdir()}/ranklog-{digest}.ipc"
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500")) + 1
    return f"tcp://{host}:{port}"


def bind_address_for(endpoint: str) -> str:
    """What the collector binds so that ranks connecting to ``endpoint`` reach it."""
    parts = urlsplit(endpoint)
    if parts.scheme == "tcp" and parts.hostname not in _LOOPBACK_HOSTS:
        return f"tcp://*:{parts.port}"
    return endpoint


def is_local_only(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and TCP on a loopback address."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    return parts.scheme == "tcp" and parts.hostname in _LOOPBACK_HOSTS
