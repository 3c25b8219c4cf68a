"""One backend of the collector's backends' process, driven step by step on a real journal.

    python -m tests.backend_harness OUT SCENARIO PHASE

Each phase is a process of its own; a phase that ends in ``os._exit`` is a crash (nothing
flushed, nothing closed), as a kill -9 of the backends' process would leave things. The
records are appended to the journal here, as the collector's receive loop would.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgpack

from ranklog.backends.feed import Feed
from ranklog.backends.jsonl import AsyncStructuredHandler
from ranklog.backends.policies import make_policy
from ranklog.backends.route import detach_handlers
from ranklog.backends.runner import Runner
from ranklog.backends.sink import Sink
from ranklog.journal import STATE_DIR, Journal, journal_path


def envelope(rank: int, step: int | None, msg: Any, hparams: bool = False) -> bytes:
    packed: bytes = msgpack.packb(
        {"v": 1, "run": "r", "rank": rank, "local_rank": rank, "world_size": 2, "host": "h",
         "pid": 1, "inc": "i", "kind": "record", "seq": 1, "time": time.time(), "logger": "m",
         "level": logging.INFO, "step": step, "hparams": hparams, "msg": msg, "extra": {}}
    )  # fmt: skip
    return packed


def crash() -> None:
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    out, scenario, phase = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    journal = Journal(journal_path(out))
    policy = {"reduce": "mean", "first": "first", "rewind": "first", "hparams": "all"}.get(scenario)
    handler = AsyncStructuredHandler(
        log_dir=out, run_name=None if scenario == "reopen" else "all", flush_interval=3600
    )
    logger = logging.getLogger("m")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    factory = partial(make_policy, policy, "jsonl", rename=False, timeout=60, world_size=2)
    logger.addHandler(handler)
    [(_, route)] = detach_handlers([logger])
    feed = Feed(Sink(handler, route, name="jsonl"), policy=factory if policy else None)
    backend = Runner(feed)

    def append(*frames: bytes) -> None:
        for frame in frames:
            journal.append(frame)
        journal.sync()

    def run_to_end_and_close() -> None:
        backend.attach_journal(journal.path, out / STATE_DIR)
        backend.advance(journal.durable_end)
        backend.request_close()
        print("clean" if backend.close_within(time.monotonic() + 10) else "unclean")

    def checkpoint_then_crash() -> None:
        backend.attach_journal(journal.path, out / STATE_DIR)
        backend.advance(journal.durable_end)
        time.sleep(1.5)  # a checkpoint after everything was read
        crash()

    if (scenario, phase) == ("reopen", "1"):
        append(*(envelope(step % 2, step, {"loss": step}) for step in range(4)))
        backend.attach_journal(journal.path, out / STATE_DIR)
        backend.advance(journal.durable_end)
        time.sleep(1.5)  # checkpointed: both rank files
        feed.checkpoints.interval = 3600
        time.sleep(1.1)  # the checkpoint already due is taken; no more after it
        append(envelope(1, 10, {"loss": 10}), envelope(1, 11, {"loss": 11}))
        backend.advance(journal.durable_end)
        time.sleep(0.5)
        handler.flush()  # written, but past the checkpoint
        crash()
    elif (scenario, phase) == ("reopen", "2"):
        backend.attach_journal(journal.path, out / STATE_DIR)  # nothing new to read
        time.sleep(1.5)  # a checkpoint while no file is open yet
        crash()
    elif (scenario, phase) == ("reopen", "3"):
        run_to_end_and_close()
    elif (scenario, phase) == ("reduce", "1"):
        append(envelope(0, 5, {"a": 1}), envelope(0, 5, {"b": 1}), envelope(1, 5, {"a": 3}),
               envelope(0, None, {"note": 1}))  # fmt: skip
        checkpoint_then_crash()
    elif (scenario, phase) == ("reduce", "2"):
        append(envelope(1, 5, {"b": 5}), envelope(0, 6, {"a": 1}), envelope(1, 6, {"a": 1}))
        run_to_end_and_close()
    elif (scenario, phase) == ("first", "1"):
        append(envelope(0, 5, {"loss": 0}), envelope(1, 5, {"loss": 1}),
               envelope(0, 5, {"val": 10}))  # fmt: skip
        checkpoint_then_crash()
    elif (scenario, phase) == ("first", "2"):
        append(envelope(1, 5, {"val": 11}))
        run_to_end_and_close()
    elif (scenario, phase) == ("rewind", "1"):
        # OUT is on a small tmpfs: fill it, let the backend fail, then free the space.
        append(envelope(0, None, {"lr": 0.1}, hparams=True), envelope(0, 1, {"loss": 1}),
               envelope(1, 1, {"loss": 2}))  # fmt: skip
        backend.attach_journal(journal.path, out / STATE_DIR)
        time.sleep(1.2)  # the first checkpoint: nothing read yet
        filler = out.parent / "filler"
        fill = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fill, bytes(4096)):
                pass
        except OSError:
            pass  # full
        os.close(fill)
        backend.advance(journal.durable_end)
        time.sleep(2.5)  # written into the buffer, failed at the checkpoint, rewound
        filler.unlink()
        time.sleep(2.5)  # retried
        backend.request_close()
        print("clean" if backend.close_within(time.monotonic() + 10) else "unclean")
    elif (scenario, phase) == ("hparams", "1"):
        append(envelope(0, None, {"lr": 0.1}, hparams=True), envelope(0, 1, {"loss": 1}))
        checkpoint_then_crash()
    elif (scenario, phase) == ("hparams", "2"):
        append(envelope(1, None, {"lr": 0.1}, hparams=True), envelope(1, 2, {"loss": 2}))
        run_to_end_and_close()
    else:
        raise SystemExit(f"unknown scenario/phase {scenario} {phase}")


if __name__ == "__main__":
    main()
