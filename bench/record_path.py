"""What one record costs in each collector process, step by step, on one thread.

    .venv/bin/python bench/record_path.py        # about 15 s

The collector's receive loop (one process) and its backends (a second process, see
``ranklog/_backend_host.py``) each spend CPU on every record; this times their steps in a
tight loop on the benchmark's record (16 metrics): the ceiling each process could reach
with a core of its own, which ``bench/collector.py`` then measures for real.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

import _common
from ranklog import AsyncStructuredHandler, IsMappingFilter
from ranklog.backends.journaled import decode_journaled
from ranklog.backends.records import build_record
from ranklog.journal import Journal, read_entries
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import RankIdentity
from ranklog.wire import decode, decode_message

CALLS = 100_000


def _per_call_us(work: Callable[[], Any], calls: int = CALLS) -> float:
    best = float("inf")
    for _ in range(3):  # best of three: the VM's neighbours only ever add time
        started = time.perf_counter()
        for _ in range(calls):
            work()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


def main() -> int:
    identity = RankIdentity(
        run_id="bench", rank=3, local_rank=3, world_size=8, local_world_size=8,
        host="bench-host", pid=12345, incarnation="0123456789abcdef",
    )  # fmt: skip
    record = logging.LogRecord("metrics", logging.INFO, "", 0, _common.metrics(5), None, None)
    record.step = 5
    frame = RecordEncoder(identity).record(7, record)
    assert isinstance(frame, bytes)
    envelope = decode(frame)
    rebuilt = build_record(envelope, 0, 0)

    with tempfile.TemporaryDirectory() as scratch:
        journal = Journal(Path(scratch) / "journal")  # a folder of segments
        for _ in range(CALLS):
            journal.append(frame)
        journal.sync()
        written = journal.end
        handler = AsyncStructuredHandler(log_dir=scratch)
        handler.addFilter(IsMappingFilter())

        def read_journal() -> None:
            for _ in read_entries(journal.path, 0, written):
                pass

        # (process, step, counted in the process's sum, µs)
        rows = [
            ("receive", "msgpack unpack of the envelope (part of decode)", False,
             _per_call_us(lambda: msgpack.unpackb(frame))),
            ("receive", "decode to a map (wire.decode; not the collector's)", False,
             _per_call_us(lambda: decode(frame))),
            ("receive", "decode (unpack + validate: decode_message)", True,
             _per_call_us(lambda: decode_message(frame))),
            ("receive", "journal append", True, _per_call_us(lambda: journal.append(frame))),
            ("backends", "journal read (per entry)", True, _per_call_us(read_journal, 1) / CALLS),
            ("backends", "decode a journal entry", True,
             _per_call_us(lambda: decode_journaled(frame))),
            ("backends", "build the LogRecord", True,
             _per_call_us(lambda: build_record(envelope, 0, 0))),
            ("backends", "AsyncStructuredHandler.handle (JSONL line)", True,
             _per_call_us(lambda: handler.handle(rebuilt))),
        ]  # fmt: skip
        handler.close()
        journal.close()

    totals = {
        side: sum(us for s, _, counted, us in rows if s == side and counted)
        for side in ("receive", "backends")
    }
    table = [[side, step, us] for side, step, _, us in rows]
    table += [[side, "sum: one core's ceiling", us] for side, us in totals.items()]
    text = _common.print_table(
        f"Per-record CPU in microseconds ({len(frame)}-byte envelope, best of 3)",
        ["process", "step", "µs per record"],
        table,
    )
    for side, us in totals.items():
        print(f"{side}: {us:.2f} µs per record -> at most {1e6 / us:,.0f} records/s on one core")
    _common.write_results(
        "record_path",
        {
            "steps": [{"process": s, "step": n, "us": us} for s, n, _, us in rows],
            "ceilings_records_per_s": {side: 1e6 / us for side, us in totals.items()},
            "table": text,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
