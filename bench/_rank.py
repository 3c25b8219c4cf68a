"""A benchmark rank process: logs metric records through ``ZMQSocketHandler``.

    python bench/_rank.py --endpoint E --world-size 8 --ranks 0 [1 2 ...] --records N
        [--rate R] [--prefill] [--close-timeout S] [--shutdown]

Each listed rank gets its own handler (its own DEALER socket, sender thread and
incarnation), as if it were its own process. With ``--wait-go`` the handlers connect first
and logging starts when a line arrives on stdin, so that many processes start together.
With ``--prefill`` every record is logged before the collector exists (the handlers hold
them, unsent), the line ``filled`` is printed, and the records flow once the collector
binds: the collector then sees more than it can take.
Otherwise ranks log at ``--rate`` records/s each (0: as fast as possible), round-robin.

Ends with ``close()`` on every handler (waits for every acknowledgement) and prints one JSON
line (or writes it to ``--result``): per-rank stats, the process's CPU seconds and, with
``--latency``, emit-to-ack latencies in seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import deque

import _common
from ranklog import IsMappingFilter, ZMQSocketHandler


class AckLatency:
    """Emit-to-ack latency per record, from the outbox's acknowledgement hook.

    ``emitting`` runs on the caller's thread just before ``logger.info``; ``acked`` on the
    sender thread (deque appends and pops are atomic).
    """

    def __init__(self) -> None:
        self.emitted: deque[tuple[int, float]] = deque()
        self.latencies: list[tuple[float, float]] = []  # (emitted at, latency)

    def emitting(self, seq: int) -> None:
        self.emitted.append((seq, time.monotonic()))

    def acked(self, seq: int) -> None:
        now = time.monotonic()
        while self.emitted and self.emitted[0][0] <= seq:
            emitted = self.emitted.popleft()[1]
            self.latencies.append((emitted, now - emitted))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--ranks", type=int, nargs="+", required=True)
    parser.add_argument("--records", type=int, required=True, help="per rank")
    parser.add_argument("--rate", type=float, default=0.0, help="records/s per rank")
    parser.add_argument("--prefill", action="store_true")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--close-timeout", type=float, default=600.0)
    parser.add_argument("--result", help="write the result JSON here instead of stdout")
    parser.add_argument("--shutdown", action="store_true", help="end with logging.shutdown()")
    parser.add_argument(
        "--wait-go", action="store_true",
        help="connect every handler, print 'ready', and start logging at a line on stdin",
    )  # fmt: skip
    args = parser.parse_args()

    loggers = []
    handlers = []
    probes = []
    for rank in args.ranks:
        handler = ZMQSocketHandler(
            args.endpoint,
            rank=rank,
            local_rank=rank,
            world_size=args.world_size,
            run_id="bench",
            max_records=max(100_000, args.records + 10),
            close_timeout=args.close_timeout,
        )
        handler.addFilter(IsMappingFilter())
        probe = AckLatency()
        if args.latency:
            handler.outbox.on_ack = probe.acked
        # One logger per rank: a logger's handlers all see every record.
        logger = logging.getLogger(f"instructlab.training.metrics.rank{rank}")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        loggers.append(logger)
        handlers.append(handler)
        probes.append(probe)

    if args.wait_go:
        for handler in handlers:
            handler.start()
        print("ready", flush=True)
        sys.stdin.readline()
    started = time.monotonic()
    cpu_started = os.times()
    interval = 1.0 / args.rate if args.rate else 0.0
    for step in range(args.records):
        for logger, probe in zip(loggers, probes, strict=True):
            if args.latency:
                probe.emitting(step + 1)  # a handler's seqs count its records from 1
            logger.info(_common.metrics(step), extra={"step": step})
        if interval:
            delay = started + (step + 1) * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    if args.prefill:
        print("filled", flush=True)
    emitted_s = time.monotonic() - started
    cpu_logged = os.times()
    closing = time.monotonic()
    if args.shutdown:
        logging.shutdown()  # as at interpreter exit: flush, then close, every handler
    else:
        for handler in handlers:
            handler.close()
    close_s = time.monotonic() - closing
    times = os.times()
    result = {
        "cpu_seconds": times.user + times.system,
        "cpu_seconds_logging": cpu_logged.user
        + cpu_logged.system
        - cpu_started.user
        - cpu_started.system,
        "emit_seconds": emitted_s,
        "close_seconds": close_s,
        "ranks": [{"rank": r, **h.stats} for r, h in zip(args.ranks, handlers, strict=True)],
    }
    if args.latency:
        result["latencies"] = [
            (at - started, latency) for probe in probes for at, latency in probe.latencies
        ]
    if args.result:
        with open(args.result, "w") as out:
            json.dump(result, out)
    else:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
