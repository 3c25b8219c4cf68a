"""The sidecar's CPU at training cadence: 8 ranks x 2 records/s on one machine.

One collector (``--logger-type``, JSONL by default) and 8 rank processes, each logging a
16-metric record every 0.5 s through ``ZMQSocketHandler`` (in step, on the wall clock's
half seconds, as a DDP job's ranks log), next to 8 processes doing the
same calls into a ``logging.NullHandler`` (same run, same load). After a warm-up, CPU time
is read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds, every thread) at the start and
end of a window: the collector's process tree (receive loop and backends' process), and
each rank process.

    .venv/bin/python bench/footprint.py                 # JSONL, about 50 s
    .venv/bin/python bench/footprint.py --logger-type async,tensorboard,wandb

Targets: the collector tree at most 1% of a core; a rank process at most 0.1% of a core
above a NullHandler's. Prints a table and writes ``bench/results/footprint.json``.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

RANKS = 8
RATE = 2.0  # records/s per rank


def _rank_process(mode: str, endpoint: str, rank: int, seconds: float, stagger: bool) -> int:
    """One rank: a record every 1/RATE seconds for ``seconds``, into ranklog or nothing;
    with ``stagger``, rank r a (r / RANKS)th of a step after rank 0."""
    handler: logging.Handler
    if mode == "ranklog":
        from ranklog import ZMQSocketHandler

        handler = ZMQSocketHandler(endpoint, rank=rank, world_size=RANKS, run_id="footprint")
    else:
        handler = logging.NullHandler()
    log = logging.getLogger("footprint")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # On the wall clock's ticks: the ranks step together, as a DDP job's do (their
    # collectives hold them in step).
    next_at = math.ceil(time.time() * RATE) / RATE + (rank / RANKS / RATE if stagger else 0)
    for step in range(int(seconds * RATE)):
        time.sleep(max(0.0, next_at - time.time()))
        log.info(_common.metrics(step), extra={"step": step})
        next_at += 1 / RATE
    handler.close()
    return 0


def cpu_ns(pids: list[int]) -> int:
    """CPU time of every thread of ``pids`` and their descendants, in nanoseconds."""
    total = 0
    for pid in pids:
        for member in _common._process_tree(pid):
            for task in Path(f"/proc/{member}/task").glob("*/schedstat"):
                try:
                    total += int(task.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    continue  # a thread that just exited
    return total


def run(logger_type: str, warmup: float, window: float, stagger: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ranklog-footprint-"))
    collector = _common.start_collector(work / "out", "--logger-type", logger_type)
    seconds = warmup + window + 2
    ranks = {
        mode: [subprocess.Popen([sys.executable, __file__, "--rank-process", mode,
                                 collector.endpoint, str(rank), str(seconds),
                                 "stagger" if stagger else "step"])
               for rank in range(RANKS)]
        for mode in ("ranklog", "null")
    }  # fmt: skip
    time.sleep(warmup)  # imports, connections, the first records: not the steady cost
    start = {"collector": cpu_ns([collector.pid])}
    start.update({f"{m}{i}": cpu_ns([p.pid]) for m, ps in ranks.items() for i, p in enumerate(ps)})
    began = time.monotonic()
    time.sleep(window)
    end = {"collector": cpu_ns([collector.pid])}
    end.update({f"{m}{i}": cpu_ns([p.pid]) for m, ps in ranks.items() for i, p in enumerate(ps)})
    elapsed = time.monotonic() - began
    for proc in [p for ps in ranks.values() for p in ps]:
        proc.wait(60)
    collector.stop()

    def percent(key: str) -> float:
        return 100 * (end[key] - start[key]) / 1e9 / elapsed

    ranklog_ranks = [percent(f"ranklog{i}") for i in range(RANKS)]
    null_ranks = [percent(f"null{i}") for i in range(RANKS)]
    return {
        "logger_type": logger_type,
        "ranks_log": "staggered" if stagger else "in step",
        "window_s": round(elapsed, 1),
        "collector_tree_pct": round(percent("collector"), 3),
        "rank_pct_median": round(statistics.median(ranklog_ranks), 3),
        "null_pct_median": round(statistics.median(null_ranks), 3),
        "rank_over_null_pct": round(
            statistics.median(ranklog_ranks) - statistics.median(null_ranks), 3
        ),
        "rank_pct": [round(p, 3) for p in ranklog_ranks],
        "null_pct": [round(p, 3) for p in null_ranks],
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-process":
        mode, endpoint, rank, seconds, phase = sys.argv[2:7]
        return _rank_process(mode, endpoint, int(rank), float(seconds), phase == "stagger")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logger-type", nargs="+", default=["async"])
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=40.0, help="seconds measured")
    parser.add_argument("--staggered", action="store_true",
                        help="also with the ranks' records spread over each step (no two "
                        "arrive together: the collector's worst case at this rate)")  # fmt: skip
    args = parser.parse_args()
    phases = [False, True] if args.staggered else [False]
    results = [run(logger_type, args.warmup, args.window, stagger)
               for logger_type in args.logger_type for stagger in phases]  # fmt: skip
    _common.print_table(
        f"CPU at training cadence: {RANKS} ranks x {RATE:g} records/s "
        f"(% of one core; {args.window:g} s window)",
        ["backends", "ranks log", "collector tree", "rank (median)",
         "NullHandler rank (median)", "rank over NullHandler"],
        [[r["logger_type"], r["ranks_log"], *(f"{r[key]:.3f}" for key in ("collector_tree_pct",
          "rank_pct_median", "null_pct_median", "rank_over_null_pct"))] for r in results],
    )  # fmt: skip
    _common.print_table(
        "targets", ["backends", "ranks log", "collector tree <= 1%",
                    "rank over NullHandler <= 0.1%"],
        [[r["logger_type"], r["ranks_log"], "met" if r["collector_tree_pct"] <= 1.0 else "NOT met",
          "met" if r["rank_over_null_pct"] <= 0.1 else "NOT met"] for r in results],
    )  # fmt: skip
    _common.write_results("footprint", {"ranks": RANKS, "rate": RATE, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
