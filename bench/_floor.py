"""The floor a collector's CPU per record is measured against, in the same run.

Per record, the least any collector writing JSONL must do: msgpack-unpack the envelope a
rank sent, orjson-encode its JSONL line (the metrics, ``step``, ``timestamp`` as ISO
text), and append both to buffers (the journal's bytes and the file's). No sockets, no
validation, no fsync, no de-duplication, no checkpoints: nothing a real collector can skip.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

import msgpack
import orjson

import _common
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import RankIdentity


def frames(count: int) -> list[bytes]:
    """``count`` envelopes as a benchmark rank sends them (16 metrics, a step each)."""
    identity = RankIdentity(
        run_id="bench", rank=3, local_rank=3, world_size=8, local_world_size=8,
        host="bench-host", pid=12345, incarnation="0123456789abcdef",
    )  # fmt: skip
    encoder = RecordEncoder(identity)
    out = []
    for step in range(count):
        metrics = _common.metrics(step)
        record = logging.LogRecord("metrics", logging.INFO, "", 0, metrics, None, None)
        record.step = step
        frame = encoder.record(step + 1, record)
        assert isinstance(frame, bytes)
        out.append(frame)
    return out


def _floor_pass(batch: list[bytes]) -> float:
    unpackb, dumps, stamp = msgpack.unpackb, orjson.dumps, datetime.fromtimestamp
    option = orjson.OPT_APPEND_NEWLINE
    journal, lines = bytearray(), bytearray()
    started = time.process_time()
    for frame in batch:
        envelope = unpackb(frame)
        entry = dict(envelope["msg"])
        entry["step"] = envelope["step"]
        entry["timestamp"] = stamp(envelope["time"])  # orjson writes isoformat()'s text
        lines += dumps(entry, option=option)
        journal += frame
    return (time.process_time() - started) / len(batch) * 1e6


def floor_us(count: int = 40_000, rounds: int = 5) -> float:
    """CPU µs per record of the floor: the best of ``rounds`` passes over ``count`` frames."""
    batch = frames(count)
    return min(_floor_pass(batch) for _ in range(rounds))
