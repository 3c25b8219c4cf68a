"""Opt-in per-rank system metrics, sampled on the sender thread: the process's resident
memory and CPU use, and CUDA memory when the program already initialised CUDA.

Nothing here imports torch: CUDA memory is read only when ``torch`` is in ``sys.modules``
and ``torch.cuda.is_initialized()``; ``memory_allocated`` and ``memory_reserved`` read the
caching allocator's counters, with no host sync.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Any

import msgpack

# The samples go out under the logger of the rank's newest record, so they reach the
# backends its metrics reach (the collector's own ``ranklog`` loggers reach none); this one
# before the first record.
DEFAULT_LOGGER = "instructlab.training.metrics"
SYSTEM_METRICS_ENV = "RANKLOG_SYSTEM_METRICS"
SYSTEM_INTERVAL_ENV = "RANKLOG_SYSTEM_INTERVAL"
DEFAULT_INTERVAL = 10.0
_MiB = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def system_metrics_wanted(enabled: bool | None) -> bool:
    """``enabled``, or else ``RANKLOG_SYSTEM_METRICS`` (``1``, ``true``, ``yes``, ``on``)."""
    if enabled is not None:
        return enabled
    return os.environ.get(SYSTEM_METRICS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def system_interval(seconds: float | None) -> float:
    """``seconds``, or else ``RANKLOG_SYSTEM_INTERVAL``, or else 10."""
    if seconds is None:
        try:
            seconds = float(os.environ.get(SYSTEM_INTERVAL_ENV, DEFAULT_INTERVAL))
        except ValueError:
            seconds = DEFAULT_INTERVAL
    return max(0.05, seconds)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE / _MiB
    except (OSError, ValueError, IndexError):  # not Linux: the peak is what there is
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (_MiB if sys.platform == "darwin" else 1024)


def _cuda_mb(local_rank: int) -> dict[str, float]:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is None or not cuda.is_initialized():
            return {}
        # The current device is per thread; torchrun's ranks use device local_rank.
        count = cuda.device_count()
        device = local_rank if local_rank < count else 0
        return {
            "system/cuda_allocated_mb": cuda.memory_allocated(device) / _MiB,
            "system/cuda_reserved_mb": cuda.memory_reserved(device) / _MiB,
        }
    except Exception:  # a CUDA error must never reach the sender thread
        return {}


class SystemSampler:
    """Every ``interval`` seconds, a dict of ``system/...`` metrics (:meth:`due`,
    :meth:`sample`); CPU% is over the time since the previous sample (100 = one core)."""

    def __init__(self, interval: float, local_rank: int) -> None:
        # The first sample waits an interval: CPU% needs one to measure over.
        self.interval = interval
        self.local_rank = local_rank
        self.next_at = time.monotonic() + interval
        self._cpu_at = (time.monotonic(), _cpu_seconds())
        self.last_step: int | None = None
        self.logger = DEFAULT_LOGGER

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def sample(self, now: float) -> dict[str, Any]:
        self.next_at = now + self.interval
        cpu = _cpu_seconds()
        then, cpu_then = self._cpu_at
        self._cpu_at = (now, cpu)
        metrics = {
            "system/rss_mb": round(_rss_mb(), 3),
            "system/cpu_percent": round(100.0 * (cpu - cpu_then) / max(now - then, 1e-6), 2),
        }
        metrics.update(_cuda_mb(self.local_rank))
        return metrics

    def note_frame(self, frame: bytes) -> None:
        """Take the step and logger of ``frame``, the newest record sent."""
        if not frame:
            return
        try:
            envelope = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        except Exception:
            return
        if not isinstance(envelope, dict):
            return
        if type(envelope.get("step")) is int:
            self.last_step = envelope["step"]
        if isinstance(envelope.get("logger"), str):
            self.logger = envelope["logger"]

    def record(self, metrics: dict[str, Any]) -> logging.LogRecord:
        """A LogRecord of the sample, at the rank's latest step."""
        record = logging.LogRecord(self.logger, logging.INFO, "", 0, metrics, None, None)
        record.step = self.last_step
        return record


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
