"""What a backend of the backends' process gets, and what it implements to get more.

Any stdlib :class:`logging.Handler` is a backend: its feed (``feed.py``, on a thread of the
backends' process) reads the journal, rebuilds each record a rank logged as a
:class:`logging.LogRecord` and calls the handler's ``handle()`` with it, behind the backend's
rank policy. Such a handler gets every record **at least once**: after a crash of the
backends' process the feed reads on from its last checkpoint (at most about a second old),
so the records since then reach the handler again. Its ``flush()`` is called at every
checkpoint and its ``close()`` once at the end; the runner owns every thread and every
timer, so a handler stays passive.

A handler that also implements :class:`Resumable` gets every record **exactly once**: the
feed asks it for its state at each checkpoint and gives that state back after a crash,
before the first record. One that implements :class:`Rewindable` as well survives a write
error (a full disk) the same way, without a crash: the feed cuts it back to its last
checkpoint and reads the journal again from there once writing works again. The write error
reaches the feed through ``handleError``: the sink (``sink.py``) gives the handler one that
raises an ``OSError`` again, so a handler keeps the stdlib's ``except Exception:
self.handleError(record)``.

The sink checks these with ``isinstance`` once, when it is built; a handler need not
inherit from anything here. Each record carries its place in the journal as two attributes,
:data:`OFFSET_ATTR` and :data:`START_ATTR`, for a backend that must say itself how far it got.

A backend (or rank policy) that keeps jobs apart, a run of its own per job, implements
:class:`StartsJobs` and calls :func:`follow_job` with each record it gets: the one place
that notices the next job, and tells the backend through ``start_job``. It is called from
``emit`` (not by the sink) so that a handler used on its own keeps its jobs apart too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ranklog.backends.owned_files import OwnedFiles

if TYPE_CHECKING:
    from ranklog.envelope import RecordEnvelope

#: A journaled record for :class:`TakesEnvelopes`: its envelope, and where its entry starts
#: and ends in the journal.
EnvelopeItem = tuple["RecordEnvelope", int, int]

#: Record attribute: the journal offset where the record's entry ends. A backend that writes
#: asynchronously (W&B) checkpoints this to say, after a crash, how far it really got.
OFFSET_ATTR = "ranklog_offset"
#: Record attribute: the journal offset where the record's entry starts (where to read
#: again to see the record again); rank policies use it.
START_ATTR = "ranklog_start"

_Started = TypeVar("_Started", covariant=True)


def job_of(record: logging.LogRecord) -> str | None:
    """The record's job (its run id: torchrun's ``TORCHELASTIC_RUN_ID``), None if it says none."""
    job = getattr(record, "run_id", None)
    return None if job is None else str(job)


class StartsJobs(Protocol[_Started]):
    """A backend (or a rank policy) that keeps jobs apart: told once when the next job
    begins, by :func:`follow_job`, before that job's first record."""

    #: The job of the records it got last (or a value of its own before the first record):
    #: what :func:`follow_job` compares each record's job with, and sets after
    #: :meth:`start_job`. A backend that checkpoints it restores it too.
    job: object

    def start_job(self, job: str | None, first: logging.LogRecord) -> _Started:
        """``first``, of ``job``, is the first record of a job other than :attr:`job`
        (still the last one's): end what belongs to the last job, begin this one's."""
        ...


def follow_job(backend: StartsJobs[_Started], record: logging.LogRecord) -> _Started | None:
    """Tell ``backend`` if ``record`` begins the next job: what its ``start_job`` returned,
    or None if the record is of the job it has. If ``start_job`` fails, the job stays the
    last one's, and the next record of the new job tries again."""
    job = job_of(record)
    if job == backend.job:
        return None
    started = backend.start_job(job, record)
    backend.job = job
    return started


@runtime_checkable
class Resumable(Protocol):
    """A backend that resumes exactly where it got to before a crash.

    Its state is a JSON-able dict, saved by the feed with the journal offset it belongs to
    (``.ranklog/backend-<name>.json``). One key has a meaning to the feed: ``"files"``,
    ``{path: size}`` for every file the backend owns (appends to). At a restart the feed
    checks that no listed file is missing or shorter than listed (a machine crash that lost
    the page cache); if one is, the backend is rebuilt from the journal's start instead.
    """

    #: The files it owns: call ``owned_files.opened(path)`` right after opening a new file
    #: (before writing to it), or ``opened()`` after starting a new remote run, so that a
    #: crash from then on still finds it in the checkpoint (the feed then calls
    #: :meth:`checkpoint`).
    owned_files: OwnedFiles

    def checkpoint(self) -> dict[str, Any]:
        """Write out what is buffered, and return the state to resume from: called on the
        runner's thread between records, about once a second."""
        ...

    def restore(self, state: dict[str, Any] | None, *, from_start: bool = False) -> int | None:
        """Before the first record: go back to ``state`` (the last :meth:`checkpoint`, or
        None). Cut owned files back to their checkpointed sizes; ``from_start``: the whole
        journal is read again, so start empty instead.

        Return None, or a journal offset (an :data:`OFFSET_ATTR` seen earlier) if the backend
        knows it got less far than the checkpoint says: the feed then reads from there.
        """
        ...


@runtime_checkable
class Rewindable(Resumable, Protocol):
    """A :class:`Resumable` backend that can also go back to its last checkpoint while
    running, after a write error (a full disk), and is then fed again from there."""

    def rewind_to(self, state: dict[str, Any] | None) -> None:
        """Drop what is not written yet and cut every owned file back to ``state`` (a file
        opened since: back to its size when opened). The next record may reopen files."""
        ...


@runtime_checkable
class TakesEnvelopes(Protocol):
    """A built-in backend that takes the journal's records as decoded envelopes, a batch at a
    time, with no LogRecord built for each: what ``handle()`` would do with each one's
    record, in order, while holding the handler's lock once.

    The feed uses it only where nothing else needs a LogRecord: no rank policy, a route
    that does not depend on the record (no logger filters), and :meth:`takes_envelopes`."""

    def takes_envelopes(self) -> bool:
        """True if every filter of the handler is one :meth:`handle_envelopes` applies."""
        ...

    def handle_envelopes(self, batch: Sequence[EnvelopeItem]) -> None:
        """Handle ``(envelope, start, end)`` for each record of ``batch``, in order: the
        :class:`~ranklog.envelope.RecordEnvelope` and where its entry
        lies in the journal (the LogRecord's :data:`START_ATTR` and :data:`OFFSET_ATTR`)."""
        ...


@runtime_checkable
class DeclaresRanks(Protocol):
    """How a backend wants the ranks of a job in front of it (see ``policies.py``)."""

    #: The rank policy put in front of it unless the user chooses one (``rank0``, ``first``,
    #: ``all``, ``mean``...); None: every record of every rank, unchanged.
    default_rank_policy: str | None
    #: True if the backend keeps the ranks' records apart itself (JSONL writes a file per
    #: rank), so the ``all`` policy need not rename keys to ``rank{r}/key``.
    keeps_ranks_apart: bool


@runtime_checkable
class HasExitTeardown(Protocol):
    """A backend whose SDK finishes work in an interpreter exit hook (W&B's service).

    When another backend hangs, the backends' process leaves with ``os._exit``, skipping
    every exit hook; it first gives this one a bounded chance to run."""

    @staticmethod
    def teardown_within(timeout: float) -> bool:
        """Run the SDK's exit work, waiting at most ``timeout`` seconds; True if it ended."""
        ...
