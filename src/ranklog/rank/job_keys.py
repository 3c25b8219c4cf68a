"""CURVE keys for the multi-node embedded collector: without them, anyone who can reach its
port could inject records.

Global rank 0 makes a key pair for the collector and one for the job's ranks, under
``<output_dir>/.ranklog/keys/<run id>/``; the collector allows only the job's public key.
The other ranks get the keys through the job's own rendezvous: ``torch.distributed``'s
``broadcast_object_list`` when the process group is initialised (every rank calls setup,
so this is one collective at setup time), else the key files themselves, which then need an
output dir on a filesystem every node shares.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ranklog.errors import ConfigError
from ranklog.journal import STATE_DIR
from ranklog.rank.identity import RankIdentity

KEYS_DIR = "keys"
WAIT_FOR_FILES = 300.0  # a node that starts late still finds rank 0's files


@dataclass(frozen=True)
class JobKeys:
    """The collector's public key and the job's client key pair (Z85 bytes)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    def client_key_file(self) -> Path:
        """The client pair as a ``.key_secret`` file in a private temporary folder, the way
        the handler reads it (``curve_key_file``)."""
        folder = Path(tempfile.mkdtemp(prefix="ranklog-keys-"))
        path = folder / "client.key_secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(
                "#   ranklog job key (client), made by rank 0 for this job only\n"
                "metadata\ncurve\n"
                f'    public-key = "{self.client_public.decode()}"\n'
                f'    secret-key = "{self.client_secret.decode()}"\n'
            )
        return path


def key_folder(output_dir: Path, job: str) -> Path:
    return output_dir / STATE_DIR / KEYS_DIR / job


def collector_flags(folder: Path) -> list[str]:
    """What the embedded collector needs: its own secret, and the job's allowed key."""
    return ["--curve-secret", str(folder / "collector.key_secret"),
            "--curve-allow", str(folder / "allowed")]  # fmt: skip


def make(folder: Path) -> JobKeys:
    """On rank 0: a fresh collector pair and job pair, written for the collector."""
    import zmq.auth

    (folder / "allowed").mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    zmq.auth.create_certificates(str(folder), "collector")
    zmq.auth.create_certificates(str(folder / "allowed"), "job")
    for secret in folder.rglob("*.key_secret"):
        os.chmod(secret, 0o600)
    return _read(folder)


def share(identity: RankIdentity, folder: Path) -> JobKeys:
    """Every rank: rank 0 makes the keys, the others receive them."""
    keys = make(folder) if identity.rank == 0 else None
    dist = _process_group()
    if dist is not None:
        box = [keys]
        dist.broadcast_object_list(box, src=0)
        received = box[0]
        if not isinstance(received, JobKeys):
            raise ConfigError("the job's CURVE keys did not arrive from rank 0")
        return received
    return keys if keys is not None else _wait_for_files(folder)


def _process_group() -> Any:
    """torch.distributed, if this job initialised it; else None."""
    torch = sys.modules.get("torch")  # never imported here: only used if the job has it
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _wait_for_files(folder: Path) -> JobKeys:
    deadline = time.monotonic() + WAIT_FOR_FILES
    while time.monotonic() < deadline:
        if (folder / "allowed" / "job.key_secret").exists() and (folder / "collector.key").exists():
            return _read(folder)
        time.sleep(0.2)
    raise ConfigError(
        f"the job's CURVE keys never appeared in {folder}: across nodes, initialise "
        "torch.distributed before setup_metric_logger, put output_dir on a filesystem every "
        "node shares, or point RANKLOG_ENDPOINT at a collector of your own"
    )


def _read(folder: Path) -> JobKeys:
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(str(folder / "collector.key"))
    client_public, client_secret = zmq.auth.load_certificate(
        str(folder / "allowed" / "job.key_secret")
    )
    assert client_secret is not None
    return JobKeys(server_public, client_public, client_secret)
