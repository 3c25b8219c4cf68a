"""What a sender is told (its endpoint, bounds, timing and batching), and the lock it may
share with its caller."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

from ranklog.rank.curve import CurveKeys


class Lock(Protocol):
    """A lock a sender can try without waiting (``threading.Lock`` or ``RLock``)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


@dataclass
class SenderSettings:
    """Timing and batching of the sender thread."""

    poll_interval: float = 0.005
    heartbeat_interval: float = 1.0
    # Resend intervals (see ranklog.rank.resend): the first, doubling up to the longest.
    ack_timeout: float = 2.0
    max_ack_timeout: float = 30.0
    batch_records: int = 512
    batch_bytes: int = 1 << 20
    # Records sent but not yet acknowledged. A window keeps a rank that catches up (after a
    # collector restart, say) from burying the collector in more than it can acknowledge
    # within ack_timeout, which would only make it resend, and bounds what the collector
    # buffers per rank.
    max_in_flight: int = 4096
    # Records wait and no collector answered for this long: warn (0: never).
    silence_warning: float = 15.0


@dataclass(frozen=True)
class SenderConfig:
    """Everything a sender is told (``ZMQSocketHandler`` builds it from its arguments); a
    forked child's sender is built from the same one."""

    endpoint: str
    max_records: int = 100_000
    max_bytes: int = 256 << 20
    close_timeout: float = 5.0
    close_limit: float = 300.0
    settings: SenderSettings = field(default_factory=SenderSettings)
    curve: CurveKeys | None = None
    spill_dir: str | os.PathLike[str] | None = None
    collector_log: str | None = None
    system_metrics: bool | None = None
    system_interval: float | None = None
    handle_signals: bool | None = None
