"""Who is logging (rank, world size, run id, from torchrun's environment), and where the
ranks of one job meet their collector when nobody configured an address."""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass

from ranklog.endpoints import ENDPOINT_ENV


@dataclass(frozen=True)
class RankIdentity:
    """The fields every envelope from one process carries."""

    run_id: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    host: str
    pid: int
    incarnation: str


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _torch_dist_rank_and_size() -> tuple[int | None, int | None]:
    # Only look at torch if the program already imported it: the rank side never imports torch.
    torch = sys.modules.get("torch")
    if torch is None:
        return None, None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None, None
    return int(dist.get_rank()), int(dist.get_world_size())


def new_incarnation() -> str:
    """A random id per process start: seq numbers restart with it."""
    return uuid.uuid4().hex[:16]


def detect_identity(
    *,
    rank: int | None = None,
    local_rank: int | None = None,
    world_size: int | None = None,
    run_id: str | None = None,
) -> RankIdentity:
    """Explicit arguments, then torchrun's environment, then torch.distributed, then 0/1."""
    dist_rank, dist_size = _torch_dist_rank_and_size()
    if rank is None:
        rank = _env_int("RANK")
    if rank is None:
        rank = dist_rank if dist_rank is not None else 0
    if world_size is None:
        world_size = _env_int("WORLD_SIZE")
    if world_size is None:
        world_size = dist_size if dist_size is not None else 1
    if local_rank is None:
        local_rank = _env_int("LOCAL_RANK")
    if local_rank is None:
        local_rank = rank
    local_world_size = _env_int("LOCAL_WORLD_SIZE") or world_size
    if run_id is None:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") or "none"
    return RankIdentity(
        run_id=run_id,
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        host=socket.gethostname(),
        pid=os.getpid(),
        incarnation=new_incarnation(),
    )


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
