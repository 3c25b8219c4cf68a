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

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ranklog.backends.protocol import START_ATTR, job_of
from ranklog.backends.rank_policy import RankPolicy, derived, rank_of
from ranklog.backends.reduce import RANKS_REPORTED, REDUCERS, ReducePolicy
from ranklog.errors import ConfigError
from ranklog.filters import IsRank0Filter
from ranklog.flatten import flatten_dict
from ranklog.names import DEFAULT_POLICY_TIMEOUT, POLICY_NAMES
from ranklog.reporting import ReportOnce

__all__ = [
    "POLICIES",
    "RANKS_REPORTED",
    "AllRanksPolicy",
    "FirstPolicy",
    "Rank0Policy",
    "RankPolicy",
    "ReducePolicy",
    "make_policy",
    "unknown_backends",
]

_log = logging.getLogger(__name__)

POLICIES = ("rank0", "first", "all", *REDUCERS)
assert POLICIES == POLICY_NAMES, "ranklog.names must list exactly the policies built here"


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
        prefix = f"rank{rank_of(record)}/"
        return [derived(record, {prefix + k: v for k, v in flatten_dict(record.msg).items()})]


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
            return [record] if rank_of(record) == 0 else []
        where = (job_of(record), record.name, step)
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
        return [derived(record, record.msg if len(fresh) == len(flat) else fresh)]

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


def make_policy(
    name: str,
    backend: str = "",
    *,
    rename: bool = True,
    timeout: float = DEFAULT_POLICY_TIMEOUT,
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
