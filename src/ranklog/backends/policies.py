"""Rank policies: which ranks' records reach one backend, and how they are merged.

A policy is a small stage that runs on its backend's own thread, in front of the
backend handler. It takes the records of every rank and hands on what that backend should
see::

    rank0   records from global rank 0 only (InstructLab's ``IsRank0Filter``)
    first   for each (logger, step, key), the value that arrived first, from any rank
    all     every rank's record; keys become ``rank{r}/key`` unless the backend already
            keeps ranks apart (the JSONL backend writes one file per rank)
    mean, min, max, sum
            one value per (step, key), reduced across the ranks that reported it; a step is
            emitted once every expected rank sent a record at that step, or ``timeout``
            seconds after its first record, always in step order. Each reduced record
            carries ``ranks_reported`` (also in the message) and ``partial``.

Whatever the policy, a hyper-parameter record (``extra={"hparams": True}``) reaches the
backend once however many ranks send it. Records without a step (and strings) cannot be
lined up across ranks, so ``first`` and the reducing policies take them from rank 0.

Jobs (run ids) stay apart: steps and hyper-parameters count per job, and a reducing
policy hands on what it held of a job when the next job begins. A record merged from ranks
is marked ``ranks_merged``: a backend names its run after the job's rank 0, not after
whichever rank came first (``run_name.run_name_for``).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ranklog.backends.protocol import START_ATTR
from ranklog.errors import ConfigError
from ranklog.filters import IsRank0Filter
from ranklog.flatten import flatten_dict
from ranklog.names import DEFAULT_POLICY_TIMEOUT, POLICY_NAMES
from ranklog.reporting import ReportOnce
from ranklog.run_name import MERGED_ATTR

_log = logging.getLogger(__name__)

REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda values: math.fsum(values) / len(values),
    "min": min,
    "max": max,
    "sum": lambda values: (
        sum(values) if all(isinstance(v, int) for v in values) else math.fsum(values)
    ),
}
POLICIES = ("rank0", "first", "all", *REDUCERS)
assert POLICIES == POLICY_NAMES, "ranklog.names must list exactly the policies built here"
DEFAULT_TIMEOUT = DEFAULT_POLICY_TIMEOUT
RANKS_REPORTED = "ranks_reported"


def _rank(record: logging.LogRecord) -> int:
    rank = getattr(record, "rank", None)
    return int(rank) if rank is not None else 0


def _job(record: logging.LogRecord) -> Any:
    return getattr(record, "run_id", None)


def _derived(record: logging.LogRecord, msg: Any, **attrs: Any) -> logging.LogRecord:
    """A copy marked as merged across ranks, not an edit: other backends hold the same
    record object."""
    copy = logging.LogRecord.__new__(logging.LogRecord)
    copy.__dict__ = {**record.__dict__, "msg": msg, "args": None, MERGED_ATTR: True, **attrs}
    return copy


class RankPolicy:
    """Base policy: every record passes, hyper-parameters once.

    The backend's thread calls :meth:`accept` for each record, :meth:`due` when
    :meth:`next_deadline` passes, and :meth:`drain` on shutdown; each returns the records
    to hand to the backend, in order. Only that one thread touches a policy.
    """

    name = "all"

    def __init__(self, backend: str = "") -> None:
        self.backend = backend
        self._hparams_seen: set[str] = set()

    def accept(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        """Take one record; return what should reach the backend now."""
        if getattr(record, "hparams", False):
            return [record] if self._admit(record) and self._first_hparams(record) else []
        return self._metrics(record, now)

    def due(self, now: float) -> list[logging.LogRecord]:
        """Records whose wait ended by ``now`` (a reducing policy's timed-out steps)."""
        return []

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has something to return, in ``time.monotonic()`` seconds."""
        return None

    def drain(self) -> list[logging.LogRecord]:
        """Everything still held, for shutdown."""
        return []

    # A restarted policy is made new, given its :meth:`checkpoint` back (:meth:`restore`),
    # then the records it held (:meth:`held_starts`) are taken again in journal order, and
    # those from :meth:`remember_from` on are shown to it with nothing handed on.

    def remember(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        """See a record from before the checkpoint again, to remember it: as :meth:`accept`,
        but what it would hand on was handed on already (the caller drops it)."""
        return self.accept(record, now)

    def held_starts(self) -> list[int]:
        """Journal offsets (entry starts) of the records held back, not yet handed on."""
        return []

    def remember_from(self) -> int | None:
        """Journal offset (entry start) from which a restarted policy must see the records
        again to remember what it already handed on (None: it needs none)."""
        return None

    def checkpoint(self) -> dict[str, Any] | None:
        """What a restarted policy needs besides the records (see above): here, which
        hyper-parameters it already handed on."""
        return {"hparams": sorted(self._hparams_seen)} if self._hparams_seen else None

    def restore(self, state: dict[str, Any] | None) -> None:
        """Take back a :meth:`checkpoint`."""
        self._hparams_seen = set((state or {}).get("hparams", ()))

    def _admit(self, record: logging.LogRecord) -> bool:
        return True

    def _first_hparams(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        content = flatten_dict(msg) if isinstance(msg, Mapping) else str(msg)
        text = json.dumps([_job(record), record.name, content], sort_keys=True, default=repr)
        key = hashlib.sha256(text.encode()).hexdigest()[:32]  # small enough to checkpoint
        if key in self._hparams_seen:
            return False
        self._hparams_seen.add(key)
        return True

    def _metrics(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        return [record]


class Rank0Policy(RankPolicy):
    """Only global rank 0's records (the default for TensorBoard and W&B)."""

    name = "rank0"
    _rank0 = IsRank0Filter()

    def _admit(self, record: logging.LogRecord) -> bool:
        return self._rank0.filter(record)

    def _metrics(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        return [record] if self._admit(record) else []


class AllRanksPolicy(RankPolicy):
    """Every rank's records; with ``rename``, keys become ``rank{r}/key``."""

    name = "all"

    def __init__(self, backend: str = "", *, rename: bool = True) -> None:
        super().__init__(backend)
        self.rename = rename

    def _metrics(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        if not self.rename or not isinstance(record.msg, Mapping):
            return [record]
        prefix = f"rank{_rank(record)}/"
        return [_derived(record, {prefix + k: v for k, v in flatten_dict(record.msg).items()})]


@dataclass
class _FirstStep:
    """What ``first`` remembers of one (logger, step)."""

    start: int  # journal offset of its first record
    keys: set[str] = field(default_factory=set)


class FirstPolicy(RankPolicy):
    """The first value for each (logger, step, key), from whichever rank sent it first.

    It remembers the keys of the last :attr:`window` distinct steps; of older steps, only
    the highest step that left the window (per job and logger). A record for a step at or
    below that mark which is not in the window was handed on already (its rank is that far
    behind: say a record resent after a collector restart), so it is dropped and counted,
    never written twice."""

    name = "first"
    # Steps remembered; a restart reads back the records of these steps, so it also bounds
    # that work.
    window = 1024
    _marks_kept = 64  # (job, logger) pairs whose mark is kept

    def __init__(self, backend: str = "") -> None:
        super().__init__(backend)
        self._seen: OrderedDict[tuple[Any, str, int], _FirstStep] = OrderedDict()
        self._passed: OrderedDict[tuple[Any, str], int] = OrderedDict()
        self._report = ReportOnce(_log)
        self._remembering = False

    @property
    def late(self) -> int:
        """Records dropped because their step left the window before they arrived."""
        return self._report["late"]

    def remember(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        # Records of a step that left the window since were judged when they came: not
        # late then, so not counted now.
        self._remembering = True
        try:
            return self.accept(record, now)
        finally:
            self._remembering = False

    def _metrics(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        step = getattr(record, "step", None)
        if step is None or not isinstance(record.msg, Mapping):
            return [record] if _rank(record) == 0 else []
        where = (_job(record), record.name, step)
        seen = self._seen.get(where)
        if seen is None:
            mark = self._passed.get(where[:2])
            if mark is not None and step <= mark:
                if not self._remembering:
                    self._count_late(step, mark)
                return []
            seen = self._seen[where] = _FirstStep(getattr(record, START_ATTR, 0))
            if len(self._seen) > self.window:
                self._forget(*self._seen.popitem(last=False)[0])
        flat = flatten_dict(record.msg)
        fresh = {k: v for k, v in flat.items() if k not in seen.keys}
        seen.keys.update(fresh)
        if not fresh:
            return []
        return [_derived(record, record.msg if len(fresh) == len(flat) else fresh)]

    def _forget(self, job: Any, logger: str, step: int) -> None:
        """``step`` leaves the window: it stays known as handed on through the mark."""
        key = (job, logger)
        self._passed[key] = max(step, self._passed.get(key, step))
        self._passed.move_to_end(key)
        if len(self._passed) > self._marks_kept:
            self._passed.popitem(last=False)

    def _count_late(self, step: int, mark: int) -> None:
        self._report(
            "late",
            "policy first for backend %s: a record for step %d arrived after steps up to %d "
            "had left its window of the last %d steps; dropped as already handed on; "
            "further late records are counted",
            self.backend,
            step,
            mark,
            self.window,
        )

    def remember_from(self) -> int | None:
        # Every step in the window, as a later record of any of them must still be judged.
        return next(iter(self._seen.values())).start if self._seen else None

    def drain(self) -> list[logging.LogRecord]:
        if self.late:
            _log.info(
                "policy first for backend %s: %d late record(s) dropped", self.backend, self.late
            )
        return []

    def checkpoint(self) -> dict[str, Any] | None:
        state = super().checkpoint() or {}
        if self._passed:
            state["passed"] = [[job, logger, step] for (job, logger), step in self._passed.items()]
        return state or None

    def restore(self, state: dict[str, Any] | None) -> None:
        super().restore(state)
        passed = (state or {}).get("passed", ())
        self._passed = OrderedDict(((job, logger), int(step)) for job, logger, step in passed)


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
        timeout: float = DEFAULT_TIMEOUT,
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
        self._job: Any = None
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
            return [record] if _rank(record) == 0 else []
        self.world_size = max(self.world_size, int(getattr(record, "world_size", None) or 1))
        ended = self._end_job(_job(record)) if _job(record) != self._job else []
        if self._emitted_step is not None and step < self._emitted_step:
            self._count_late(step)
            return ended + self.due(now)
        rank = _rank(record)
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
        if rank < _rank(group.first):
            group.first = record
        for key, value in flatten_dict(record.msg).items():
            group.values.setdefault(key, {})[rank] = value
        return ended + self.due(now)

    def _end_job(self, job: Any) -> list[logging.LogRecord]:
        """The next job began: hand on what is held of the last one; start steps afresh."""
        why = "when the next job began"
        held = [self._emit(heapq.heappop(self._heap), why) for _ in range(len(self._heap))]
        if self._job is not None:  # None: a fresh policy, or a checkpoint from before jobs
            self._emitted_step = None
        self._job = job
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
        return {**state, "job": self._job} if self._job is not None else state

    def restore(self, state: dict[str, Any] | None) -> None:
        super().restore(state)
        self._emitted_step = (state or {}).get("emitted_step")  # later steps only, in order
        self._job = (state or {}).get("job")

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
        return _derived(group.first, msg, ranks_reported=reported, partial=partial)

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


def make_policy(
    name: str,
    backend: str = "",
    *,
    rename: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    world_size: int | None = None,
) -> RankPolicy:
    """Build the policy called ``name`` for ``backend``.

    ``rename`` says whether ``all`` prefixes keys with ``rank{r}/`` (not for a backend that
    already keeps ranks apart); ``timeout`` and ``world_size`` matter to the reducing ones.
    """
    if name == "rank0":
        return Rank0Policy(backend)
    if name == "first":
        return FirstPolicy(backend)
    if name == "all":
        return AllRanksPolicy(backend, rename=rename)
    if name in REDUCERS:
        return ReducePolicy(name, backend, timeout=timeout, world_size=world_size)
    raise ConfigError(f"unknown rank policy {name!r}; expected one of {', '.join(POLICIES)}")


def unknown_backends(policies: Mapping[str, str], backends: Sequence[str]) -> list[str]:
    """Names in ``policies`` that no configured backend has."""
    return [name for name in policies if name not in backends]
