"""How a sender ends: what ``Sender.close()`` and the sender's thread share meanwhile
(:class:`Ending`), and what a rank says when it could not deliver everything: the one
warning line of ``close()`` and of a signal, naming the spill file and how it gets to a
collector."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from ranklog.journal import STATE_DIR
from ranklog.rank.outbox import Outbox
from ranklog.rank.spill import SpillFile
from ranklog.wire import GOODBYE


class Ending:
    """What ``Sender.close()`` and the link's thread share while a sender ends."""

    def __init__(self) -> None:
        # close() began: the thread says goodbye once everything is acknowledged.
        self.closing = threading.Event()
        # close() stopped waiting: the thread sends its goodbye at once and stops.
        self.give_up = threading.Event()
        self.goodbye: tuple[int, bytes] | None = None  # queued once everything was acked
        self.spill: SpillFile | None = None
        self.spill_error: OSError | None = None
        self.spilled = 0
        self.why = ""  # why close() stopped waiting
        self.cause = ""  # the signal that ended the process, if one did
        self.spill_fallback = ""  # why the output dir's spill folder did not take the file


def ending_step(
    ending: Ending,
    outbox: Outbox,
    next_seq: Callable[[], int],
    control: Callable[..., bytes],
) -> tuple[bool, bytes | None]:
    """The sender thread's part, once a pass while its sender closes: whether the thread
    should stop, and the frame to send as its last word (its goodbye, on giving up).
    ``control`` packs a control envelope with the counters."""
    if ending.give_up.is_set():
        if ending.goodbye is None:
            seq = next_seq()
            # Records neither delivered nor spilled are lost: the collector stops waiting.
            base = {} if ending.spilled else {"base": seq}
            ending.goodbye = (seq, control(GOODBYE, seq=seq, spilled=ending.spilled, **base))
            # Held, like any message not acknowledged; unbounded: it must not push out
            # (and count as dropped) a record already spilled.
            outbox.put(*ending.goodbye, bounded=False)
        return True, ending.goodbye[1]
    if ending.goodbye is None:
        if outbox.pending() == 0:
            seq = next_seq()
            ending.goodbye = (seq, control(GOODBYE, seq=seq, spilled=0))
            outbox.put(*ending.goodbye, bounded=False)
        return False, None
    return outbox.pending() == 0, None


def undelivered_line(
    rank: int,
    endpoint: str,
    ending: Ending,
    *,
    records: int,
    dropped: int,
    spill_dir: str | os.PathLike[str] | None,
) -> str:
    """The warning for what was not delivered (``records`` records, else only the goodbye)
    and ``dropped`` records; ``ending`` says why, and where they were spilled."""
    cause = f"got {ending.cause} and " if ending.cause else ""
    what = f"{records} record(s)" if records else "its goodbye"
    text = f"ranklog: rank {rank} {cause}could not deliver {what}"
    text += f" to {endpoint} ({ending.why or 'is the collector running?'})"
    if records and ending.spill is not None and ending.spill_error is None:
        where = recovery(ending.spill.path, spill_dir, ending.spill_fallback)
        text += f"; {records} record(s) are spilled to {ending.spill.path}: {where}"
    elif records:
        text += "; " + lost(records, ending.spill_error)
    if dropped:
        text += f"; and it dropped {dropped} record(s) because its buffer was full"
    return text


def lost(records: int, spill_error: OSError | None) -> str:
    return (
        f"{records} record(s) unacknowledged could not be spilled either "
        f"({spill_error}): those the collector did not journal before it "
        "stopped answering are lost"
    )


def recovery(path: Path, spill_dir: str | os.PathLike[str] | None, fallback: str) -> str:
    """How the spill file at ``path`` gets to a collector (the README's recovery steps);
    ``fallback``: why the output dir's spill folder did not take it."""
    wanted = None if spill_dir is None else Path(spill_dir)
    if wanted is not None and path.parent == wanted:
        return (
            "the next collector (or `ranklog replay`) serving the job's output directory "
            "ingests them from its .ranklog/spill/ folder"
        )
    output_dir = "<output-dir>"
    if wanted is not None and wanted.parent.name == STATE_DIR:
        output_dir = str(wanted.parent.parent)
    why = f" ({fallback})" if fallback else ""
    return (
        f"this is the rank's local folder{why}; to bring them back move the file into "
        f"{output_dir}/.ranklog/spill/, then run `ranklog replay --output-dir {output_dir}` "
        "with the job's --logger-type (or let the next collector on that dir ingest it)"
    )
