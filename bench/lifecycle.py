"""A collector's long life: restart time against history, and disk use under retention.

Sections (``--section``, default all):

* restart: for each ``--sizes`` record count, an output directory that took that many
  records (16 metrics each, default retention, so the journal keeps them all), then the
  time until ``ranklog collect`` on it says it listens: after a clean stop (the snapshot
  covers everything), after a ``kill -9`` (the snapshot of the last segment rotation, then
  the journal after it), and on a fresh directory for comparison.
* retention: ``--retention-records`` records under ``--journal-retention``: the most
  ``.ranklog/`` held while they flowed, what it holds afterwards, and the journal's size.
* exit: the exit burst. ``--burst-ranks`` rank processes (default 8) each log
  ``--burst-records`` records of 16 metrics (default 40,000) as fast as they can, then call
  ``logging.shutdown()`` with the handler's default close settings while the collector
  (``--burst-logger-type``, default ``async``) is still behind: records lost and doubled
  (from the JSONL files), records left spilled, each rank's time in ``logging.shutdown()``
  (the drain), and how long the collector took to exit after the last rank.

Each section is a function of (arguments, work directory) returning its rows and JSON;
another section is one more entry in ``SECTIONS``.

    .venv/bin/python bench/lifecycle.py                          # 10k and 100k records
    .venv/bin/python bench/lifecycle.py --sizes 10000 100000 1000000

Prints tables and writes ``bench/results/lifecycle.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common

RANKS = 2
MiB = 1 << 20
Section = Callable[[argparse.Namespace, Path], dict[str, Any]]


def _log_records(endpoint: str, records: int) -> None:
    """``records`` in all, from RANKS rank processes, each waited for (all acknowledged)."""
    procs = []
    for rank in range(RANKS):
        command = [sys.executable, _common.RANK_SCRIPT, "--endpoint", endpoint,
                   "--world-size", str(RANKS), "--ranks", str(rank),
                   "--records", str(records // RANKS)]  # fmt: skip
        procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
    for proc in procs:
        proc.wait(3600)


def _state_bytes(output_dir: Path) -> int:
    total = 0
    for path in (output_dir / ".ranklog").rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a segment deleted while we looked
            total += path.stat().st_size if path.is_file() else 0
    return total


def _ready_seconds(output_dir: Path, *args: str) -> float:
    started = time.monotonic()
    collector = _common.start_collector(output_dir, *args)
    ready = time.monotonic() - started
    collector.stop()
    return ready


# -- restart time against history -------------------------------------------------------


def restart(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    runs = []
    for size in args.sizes:
        print(f"restart: {size:,} records ...", file=sys.stderr, flush=True)
        out = workdir / f"history-{size}"
        collector = _common.start_collector(out)
        _log_records(collector.endpoint, size)
        collector.proc.send_signal(signal.SIGKILL)  # no snapshot at its end
        collector.proc.wait(30)
        killed = _ready_seconds(out)  # the last rotation's snapshot, the journal after it
        clean = min(_ready_seconds(out) for _ in range(3))  # a snapshot at the end
        fresh = min(_ready_seconds(workdir / f"fresh-{size}-{n}") for n in range(3))
        journal = sum(p.stat().st_size for p in (out / ".ranklog" / "journal").glob("*.seg"))
        runs.append({"records": size, "journal_mib": journal / MiB, "fresh_s": fresh,
                     "clean_restart_s": clean, "restart_after_kill_s": killed})  # fmt: skip
    rows = [[r["records"], r["journal_mib"], r["fresh_s"], r["clean_restart_s"],
             r["restart_after_kill_s"]] for r in runs]  # fmt: skip
    _common.print_table(
        "Restart: seconds until `ranklog collect` listens, against journal history",
        ["records", "journal MiB", "fresh dir s", "after clean stop s", "after kill -9 s"],
        rows,
    )
    return {"runs": runs}


# -- disk use under retention -----------------------------------------------------------


def retention(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    print(f"retention: {args.retention_records:,} records ...", file=sys.stderr, flush=True)
    out = workdir / "retention"
    collector = _common.start_collector(out, "--journal-retention", args.retention)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, _state_bytes(out))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    _log_records(collector.endpoint, args.retention_records)
    exit_code = collector.stop()
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    after = _state_bytes(out)
    accepted = _common.accepted(collector.log())
    result = {"records": args.retention_records, "retention": args.retention,
              "peak_mib": peak / MiB, "after_mib": after / MiB, "seconds": seconds,
              "accepted": accepted, "exit": exit_code}  # fmt: skip
    _common.print_table(
        f"Disk use of .ranklog/ under --journal-retention {args.retention}",
        ["records", "accepted", "peak MiB", "after MiB", "seconds", "exit"],
        [[result["records"], accepted, result["peak_mib"], result["after_mib"], seconds,
          exit_code]],
    )  # fmt: skip
    return result


# -- the exit burst -----------------------------------------------------------------------


def _lost_and_doubled(output_dir: Path, ranks: int, records: int) -> tuple[int, int]:
    lost = doubled = 0
    for rank in range(ranks):
        seen: dict[int, int] = {}
        path = output_dir / f"training_params_and_metrics_global{rank}.jsonl"
        with contextlib.suppress(FileNotFoundError), open(path) as lines:
            for line in lines:
                step = json.loads(line).get("step")
                seen[step] = seen.get(step, 0) + 1
        lost += sum(1 for step in range(records) if step not in seen)
        doubled += sum(count - 1 for count in seen.values() if count > 1)
    return lost, doubled


def exit_burst(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ranks, records = args.burst_ranks, args.burst_records
    print(f"exit burst: {ranks} x {records:,} records ...", file=sys.stderr, flush=True)
    out = workdir / "exit-burst"
    collector = _common.start_collector(out, "--world-size", str(ranks), "--exit-when-done",
                                        "--logger-type", args.burst_logger_type)  # fmt: skip
    results = [out / f"rank{rank}.json" for rank in range(ranks)]
    procs = [
        subprocess.Popen([sys.executable, _common.RANK_SCRIPT, "--endpoint", collector.endpoint,
                          "--world-size", str(ranks), "--ranks", str(rank), "--records",
                          str(records), "--close-timeout", "5", "--shutdown", "--result",
                          str(results[rank])], stderr=subprocess.PIPE, text=True)
        for rank in range(ranks)
    ]  # fmt: skip
    warnings = [proc.communicate(timeout=3600)[1] for proc in procs]
    last_rank = time.monotonic()
    exit_code = collector.proc.wait(600)
    collector_after = time.monotonic() - last_rank
    closes = [json.loads(path.read_text())["close_seconds"] for path in results]
    lost, doubled = _lost_and_doubled(out, ranks, records)
    spilled = len(list((out / ".ranklog" / "spill").glob("*.spill")))
    result = {"ranks": ranks, "records": ranks * records, "logger_type": args.burst_logger_type,
              "lost": lost, "doubled": doubled, "spill_files_left": spilled,
              "drain_s_max": max(closes), "drain_s_median": sorted(closes)[len(closes) // 2],
              "collector_exit_after_last_rank_s": collector_after, "exit": exit_code,
              "rank_warnings": sum("RuntimeWarning" in w for w in warnings)}  # fmt: skip
    _common.print_table(
        f"Exit burst: {ranks} ranks x {records:,} records, then logging.shutdown()",
        ["records", "lost", "doubled", "spill files", "drain s (max)", "drain s (median)",
         "collector exit after last rank s", "exit"],
        [[result["records"], lost, doubled, spilled, result["drain_s_max"],
          result["drain_s_median"], collector_after, exit_code]],
    )  # fmt: skip
    return result


SECTIONS: dict[str, Section] = {"restart": restart, "retention": retention, "exit": exit_burst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000], help="records of history"
    )
    parser.add_argument("--retention", default="8MiB", help="--journal-retention to measure")
    parser.add_argument("--retention-records", type=int, default=200_000)
    parser.add_argument("--burst-ranks", type=int, default=8)
    parser.add_argument("--burst-records", type=int, default=40_000, help="per rank")
    parser.add_argument("--burst-logger-type", default="async")
    parser.add_argument("--keep", action="store_true", help="keep the output directories")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ranklog-bench-lifecycle-"))
    results: dict[str, Any] = {}
    try:
        for name in args.section:
            results[name] = SECTIONS[name](args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _common.write_results("lifecycle", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
