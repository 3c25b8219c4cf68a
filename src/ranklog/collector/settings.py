"""What a collector is told: the one place its defaults are written.

``ranklog collect`` and ``ranklog replay`` take their flags' defaults from these fields, and
:class:`~ranklog.collector.collector.Collector` takes them whole (or as keywords, through
:meth:`ServeSettings.of`).

>>> ServeSettings(BackendSettings(world_size=2), exit_when_done=True).silence_timeout
60.0
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ranklog.endpoints import is_local_only
from ranklog.errors import ConfigError
from ranklog.names import (
    DEFAULT_POLICY_TIMEOUT,
    check_run_name,
    parse_logger_types,
    parse_policy_spec,
)
from ranklog.pipe import BackendSpec

# Defaults of ``ranklog collect``'s flags, so the embedded collector (started by
# setup_metric_logger) takes them from the ranks' environment.
STALL_TIMEOUT_ENV = "RANKLOG_STALL_TIMEOUT"
JOB_STALL_TIMEOUT_ENV = "RANKLOG_JOB_STALL_TIMEOUT"
METRICS_PORT_ENV = "RANKLOG_METRICS_PORT"
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(size: str | int) -> int:
    """Bytes from ``8MiB``, ``10GiB``, ``500MB``, ``1.5G`` or a plain number of bytes.

    >>> parse_size("8MiB"), parse_size("500MB"), parse_size(4096)
    (8388608, 500000000, 4096)
    """
    if isinstance(size, int):
        match = _SIZE.fullmatch(str(size)) if size >= 0 else None
    else:
        match = _SIZE.fullmatch(size)
    if match is None:
        raise ConfigError(
            f"expected a size such as 8MiB, 10GiB, 500MB or a number of bytes, got {size!r}"
        )
    number, unit, binary = match.groups()
    if binary and not unit:
        raise ConfigError(f"expected a size such as 8MiB, got {size!r}")
    return int(float(number) * (1024 if binary else 1000) ** _POWERS[unit.lower()])


@dataclass(frozen=True)
class BackendSettings:
    """What the backends are and where they write: all that ``replay`` needs.

    ``logger_types`` and ``policy`` are checked on construction (a :class:`ConfigError`
    names the problem); ``loggers`` and ``policies`` hold them parsed.
    """

    output_dir: str | Path = "logs"
    logger_types: str | list[str] = "async"
    run_name: str | None = None
    config: str | Path | None = None  # a dictConfig file, instead of ``logger_types``
    world_size: int | None = None
    policy: str | Mapping[str, str] | None = None  # per backend: rank0, first, all, mean, ...
    policy_timeout: float = DEFAULT_POLICY_TIMEOUT
    drain_timeout: float = 30.0
    # Arguments per backend: {"tensorboard": {"log_dir": ...}} (ranklog.names.BACKEND_OPTIONS).
    options: Mapping[str, Mapping[str, str]] | None = None
    # Journal kept beyond what every backend has read: a bounded history for `ranklog
    # replay --from-start` and backends added later. A size: 8MiB, 10GiB, 500MB, bytes.
    journal_retention: str | int = "1GiB"
    loggers: list[str] = field(init=False)
    policies: dict[str, str] = field(init=False)
    retention_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        check_run_name(self.run_name)
        object.__setattr__(self, "loggers", parse_logger_types(self.logger_types))
        object.__setattr__(self, "policies", parse_policy_spec(self.policy))
        try:
            retention = parse_size(self.journal_retention)
        except ConfigError as exc:
            raise ConfigError(f"journal retention: {exc}") from None
        object.__setattr__(self, "retention_bytes", retention)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def spec(self, *, from_start: bool, log_level: int = logging.INFO) -> BackendSpec:
        """What the backends' process is to run."""
        return BackendSpec(
            output_dir=str(self.output_dir),
            loggers=self.loggers,
            run_name=self.run_name,
            config=str(self.config) if self.config else None,
            policies=self.policies,
            options={name: dict(args) for name, args in (self.options or {}).items()},
            world_size=self.world_size,
            policy_timeout=self.policy_timeout,
            drain_timeout=self.drain_timeout,
            from_start=from_start,
            log_level=log_level,
            journal_retention=self.retention_bytes,
        )


@dataclass(frozen=True)
class ServeSettings:
    """A listening collector: its backends, plus the socket, liveness and exit rule.

    Binding TCP beyond loopback needs ``allow_remote``; ``exit_when_done`` needs the
    backends' ``world_size``; ``curve_allow`` needs ``curve_secret``.
    """

    backends: BackendSettings = field(default_factory=BackendSettings)
    bind: str = "tcp://127.0.0.1:5555"
    exit_when_done: bool = False
    silence_timeout: float = 60.0  # seconds without a heartbeat before a rank counts as gone
    # With exit_when_done: how long a rank that never connected is waited for (None: as
    # long as it takes).
    connect_timeout: float | None = None
    # The process that started this collector for its job (the embedded default: rank 0).
    # Once it has exited, no new rank will connect and a rank silent for a few seconds is
    # gone (a job that failed at start must not leave its collector waiting forever).
    parent_pid: int | None = None
    status_interval: float = 30.0
    allow_remote: bool = False
    curve_secret: Path | None = None  # the collector's own key pair (``ranklog keys``)
    curve_allow: Path | None = None  # a directory of allowed client public keys
    # Seconds a heard rank may go without stepping while others step before it counts as
    # stalled (``rank_stalled``); 0 turns this off.
    stall_timeout: float = 300.0
    # The least seconds without any rank stepping, every rank heard, before the job counts
    # as hung (``job_stalled``; collector/hung.py has the whole rule); 0 turns this off.
    job_stall_timeout: float = 120.0
    metrics_port: int | None = None  # a Prometheus endpoint (/metrics) on this port
    metrics_host: str = "127.0.0.1"
    # User metrics whose latest value /metrics exports (``ranklog_metric{name, rank}``).
    export_metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.allow_remote and not is_local_only(self.bind):
            raise ConfigError(
                f"refusing to listen on {self.bind}: beyond this machine; pass "
                "allow_remote=True (--allow-remote) to accept ranks from other hosts"
            )
        if self.curve_allow is not None and self.curve_secret is None:
            raise ConfigError("curve_allow needs curve_secret: the collector's own key pair")
        metrics = f"tcp://{self.metrics_host}:{self.metrics_port}"
        if self.metrics_port is not None and not self.allow_remote and not is_local_only(metrics):
            raise ConfigError(
                f"refusing to serve /metrics on {self.metrics_host}: beyond this machine; pass "
                "allow_remote=True (--allow-remote) to allow it"
            )
        object.__setattr__(self, "export_metrics", tuple(self.export_metrics or ()))
        for name in ("stall_timeout", "job_stall_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (off) or more, got {getattr(self, name)}")
        if self.exit_when_done and not self.backends.world_size:
            raise ConfigError("exit_when_done needs world_size: how many ranks to wait for")

    @classmethod
    def of(cls, **options: Any) -> ServeSettings:
        """Settings from keywords: any field of this class or of :class:`BackendSettings`
        (a path may be given as text); the rest keep their defaults."""
        backend_fields = {f.name for f in fields(BackendSettings) if f.init}
        unknown = options.keys() - backend_fields - {f.name for f in fields(cls) if f.init}
        if unknown or "backends" in options:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown or {'backends'}))}")
        backends = BackendSettings(**{k: v for k, v in options.items() if k in backend_fields})
        serve = {k: v for k, v in options.items() if k not in backend_fields}
        for name in ("curve_secret", "curve_allow"):
            if serve.get(name):
                serve[name] = Path(serve[name])
        return cls(backends, **serve)


DEFAULT_BIND = ServeSettings.bind
