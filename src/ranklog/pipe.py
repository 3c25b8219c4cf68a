"""The collector's pipe to the backends' process: the third format, beside the wire and the
journal.

    parent -> child stdin:  one JSON line (a :class:`BackendSpec`), then "<durable end>\\n"
                            per commit, then "drain <durable end>\\n"
    child -> parent stdout: one JSON line once the backends run: {"backends": [names]},
                            or why they cannot: {"error": "..."}
    exit status:            0 every backend drained and closed, 1 one did not, 2 bad config

Each backend's checkpoint (:func:`checkpoint_path`) says how far it got; the collector reads
it for ``ranklog top``'s lag.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ranklog.journal import DEFAULT_RETENTION
from ranklog.names import DEFAULT_POLICY_TIMEOUT

DRAIN = "drain"


def checkpoint_path(state_dir: Path, backend: str) -> Path:
    """The checkpoint file of backend ``backend`` in the output dir's ``state_dir``."""
    return state_dir / f"backend-{backend}.json"


@dataclass(frozen=True)
class BackendSpec:
    """What the backends' process runs, and how."""

    output_dir: str
    loggers: list[str] = field(default_factory=lambda: ["async"])
    run_name: str | None = None
    config: str | None = None  # a dictConfig file, instead of ``loggers``
    policies: dict[str, str] = field(default_factory=dict)
    # Per backend, arguments for its handler (InstructLab's setup keywords: a TensorBoard
    # log_dir, a W&B project, an MLflow tracking URI, ...); see ranklog.names.BACKEND_OPTIONS.
    options: dict[str, dict[str, str]] = field(default_factory=dict)
    world_size: int | None = None
    policy_timeout: float = DEFAULT_POLICY_TIMEOUT
    drain_timeout: float = 30.0
    from_start: bool = False
    log_level: int = 20
    # Bytes of journal kept once every backend here has read past them (--journal-retention).
    journal_retention: int = DEFAULT_RETENTION
    # The embedded collector's --alert-fd (rank 0's terminal), inherited: the backends'
    # warnings go there too; ``alert_log`` names the log that keeps every line.
    alert_fd: int | None = None
    alert_log: str = ""

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: str | bytes) -> BackendSpec:
        return cls(**json.loads(line))


def announcement(durable_end: int, *, drain: bool = False) -> bytes:
    """The line that tells the backends how far the journal is durable."""
    return b"%s%d\n" % (b"drain " if drain else b"", durable_end)


def read_announcement(line: str) -> tuple[int, bool]:
    """``(durable end, drain?)`` from one announcement line."""
    command, _, end = line.strip().rpartition(" ")
    return int(end), command == DRAIN
