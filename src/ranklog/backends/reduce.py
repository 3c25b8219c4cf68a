"""The reducing rank policies: ``mean``, ``min``, ``max`` and ``sum`` across ranks, one
value per (step, key), in step order (see ``policies.py``)."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ranklog.backends.protocol import START_ATTR, follow_job
from ranklog.backends.rank_policy import RankPolicy, derived, rank_of
from ranklog.flatten import flatten_dict
from ranklog.names import DEFAULT_POLICY_TIMEOUT
from ranklog.reporting import ReportOnce

_log = logging.getLogger(__name__)

REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda values: math.fsum(values) / len(values),
    "min": min,
    "max": max,
    "sum": lambda values: (
        sum(values) if all(isinstance(v, int) for v in values) else math.fsum(values)
    ),
}
RANKS_REPORTED = "ranks_reported"


@dataclass(order=True)
class _Step:
    """The records of one (logger, step) from several ranks, waiting to be reduced."""

    step: int
    order: int
    logger: str = field(compare=False)
    deadline: float = field(compare=False)
    first: logging.LogRecord = field(compare=False)
    values: dict[str, dict[int, Any]] = field(default_factory=dict, compare=False)
    ranks: set[int] = field(default_factory=set, compare=False)
    starts: list[int] = field(default_factory=list, compare=False)  # its records' entries


class ReducePolicy(RankPolicy):
    """One value per (step, key) across ranks: ``mean``, ``min``, ``max`` or ``sum``.

    ``world_size`` ranks are expected (or as many as the records say, if more); a step
    waits at most ``timeout`` seconds for the missing ones, then goes out marked partial.
    Steps leave in step order; a record for a step older than one already emitted is
    dropped and counted. Values that are not numbers are taken from the lowest rank.
    """

    def __init__(
        self,
        op: str,
        backend: str = "",
        *,
        timeout: float = DEFAULT_POLICY_TIMEOUT,
        world_size: int | None = None,
    ) -> None:
        super().__init__(backend)
        self.name = op
        self.timeout = timeout
        self.world_size = world_size or 0
        self._reduce = REDUCERS[op]
        self._heap: list[_Step] = []
        self._open: dict[tuple[str, int], list[_Step]] = {}
        self._order = itertools.count()
        self._emitted_step: int | None = None
        #: The job of the steps held (None: a fresh policy, or a checkpoint from before jobs).
        self.job: object = None
        self._report = ReportOnce(_log)

    @property
    def partial(self) -> int:
        """Steps emitted with fewer ranks than expected."""
        return self._report["partial"]

    @property
    def late(self) -> int:
        """Records dropped for a step older than one already emitted."""
        return self._report["late"]

    def _metrics(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        step = getattr(record, "step", None)
        if step is None or not isinstance(record.msg, Mapping):
            return [record] if rank_of(record) == 0 else []
        self.world_size = max(self.world_size, int(getattr(record, "world_size", None) or 1))
        ended = follow_job(self, record) or []
        if self._emitted_step is not None and step < self._emitted_step:
            self._count_late(step)
            return ended + self.due(now)
        rank = rank_of(record)
        # A rank's n-th record at a step joins the n-th group of that step, so that a second
        # dict logged at the same step (say a validation loss) lines up across ranks too.
        groups = self._open.setdefault((record.name, step), [])
        group = next((g for g in groups if rank not in g.ranks), None)
        if group is None:
            group = _Step(step, next(self._order), record.name, now + self.timeout, record)
            groups.append(group)
            heapq.heappush(self._heap, group)
        group.ranks.add(rank)
        group.starts.append(getattr(record, START_ATTR, 0))
        if rank < rank_of(group.first):
            group.first = record
        for key, value in flatten_dict(record.msg).items():
            group.values.setdefault(key, {})[rank] = value
        return ended + self.due(now)

    def start_job(self, job: str | None, first: logging.LogRecord) -> list[logging.LogRecord]:
        """The next job began: hand on what is held of the last one; start steps afresh."""
        why = "when the next job began"
        held = [self._emit(heapq.heappop(self._heap), why) for _ in range(len(self._heap))]
        if self.job is not None:  # None: a fresh policy, or a checkpoint from before jobs
            self._emitted_step = None
        return held

    def due(self, now: float) -> list[logging.LogRecord]:
        out = []
        while self._heap and (
            len(self._heap[0].ranks) >= self.world_size or now >= self._heap[0].deadline
        ):
            out.append(self._emit(heapq.heappop(self._heap), f"after {self.timeout:g}s"))
        return out

    def next_deadline(self) -> float | None:
        return self._heap[0].deadline if self._heap else None

    def held_starts(self) -> list[int]:
        return [start for group in self._heap for start in group.starts]

    def checkpoint(self) -> dict[str, Any] | None:
        state = {**(super().checkpoint() or {}), "emitted_step": self._emitted_step}
        return {**state, "job": self.job} if self.job is not None else state

    def restore(self, state: dict[str, Any] | None) -> None:
        super().restore(state)
        self._emitted_step = (state or {}).get("emitted_step")  # later steps only, in order
        self.job = (state or {}).get("job")

    def drain(self) -> list[logging.LogRecord]:
        out = [self._emit(heapq.heappop(self._heap), "at shutdown") for _ in range(len(self._heap))]
        if self.partial or self.late:
            _log.info(
                "policy %s for backend %s: %d step(s) emitted partial, %d late record(s) dropped",
                self.name,
                self.backend,
                self.partial,
                self.late,
            )
        return out

    def _emit(self, group: _Step, why: str) -> logging.LogRecord:
        groups = self._open[(group.logger, group.step)]
        groups.remove(group)
        if not groups:
            del self._open[(group.logger, group.step)]
        self._emitted_step = group.step
        msg = {key: self._combine(by_rank) for key, by_rank in group.values.items()}
        reported = len(group.ranks)
        msg[RANKS_REPORTED] = reported
        partial = reported < self.world_size
        if partial:
            self._report(
                "partial",
                "policy %s for backend %s: step %d had %d of %d ranks %s; emitted as "
                "partial (ranks_reported=%d); further partial steps are counted",
                self.name,
                self.backend,
                group.step,
                reported,
                self.world_size,
                why,
                reported,
            )
        return derived(group.first, msg, ranks_reported=reported, partial=partial)

    def _combine(self, by_rank: dict[int, Any]) -> Any:
        values = [by_rank[rank] for rank in sorted(by_rank)]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return self._reduce(values)
        return values[0]

    def _count_late(self, step: int) -> None:
        self._report(
            "late",
            "policy %s for backend %s: a record for step %d arrived after step %d was "
            "emitted; dropped (raise --policy-timeout if a rank is this slow); further "
            "late records are counted",
            self.name,
            self.backend,
            step,
            self._emitted_step,
        )
