"""1,024 ranks into one collector: zero loss, emit-to-ack latency, collector CPU and RSS.

1,024 rank identities (``ZMQSocketHandler(rank=i, world_size=1024)``, each with its own
DEALER socket and sender thread), spread over a few processes, log at a steady rate into
one ``ranklog collect`` writing JSONL (one file per rank). Latency runs from just before
``logger.info`` to the acknowledgement that releases the record (the outbox's ``on_ack``
hook, on the sender thread), so it includes batching, the network, the collector's journal
fsync and the ack's way back.

    .venv/bin/python bench/scale.py                          # about a minute and a half
    .venv/bin/python bench/scale.py --ranks 256 --seconds 10

Prints a table and writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument(
        "--processes",
        type=int,
        default=4,
        help="rank processes; more than the machine has cores adds GIL convoys",
    )
    parser.add_argument("--rate", type=float, default=2.0, help="records/s per rank")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long ranks log")
    parser.add_argument("--keep", action="store_true", help="keep the output directory")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="py-spy the collector and one rank process for this long, from "
                        "the start of logging, into bench/results/")  # fmt: skip
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ranklog-bench-scale-"))
    records = max(1, int(args.rate * args.seconds))
    try:
        result = run(
            workdir, args.ranks, args.processes, records, args.rate, args.seconds, args.profile
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result, args)
    return 0


def run(
    workdir: Path,
    ranks: int,
    processes: int,
    records: int,
    rate: float,
    seconds: float,
    profile: float = 0.0,
) -> dict[str, Any]:
    endpoint = f"tcp://127.0.0.1:{_common.free_port()}"
    output_dir = workdir / "out"
    collector = _common.start_collector(
        output_dir, "--logger-type", "async", "--world-size", str(ranks), "--exit-when-done",
        "--status-interval", "5", bind=endpoint,
    )  # fmt: skip
    sampler = _common.Sampler(collector.pid, output_dir, count_lines=False)
    sampler.start()
    groups = [list(range(ranks))[index::processes] for index in range(processes)]
    results = [workdir / f"rank-process-{index}.json" for index in range(len(groups))]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                _common.RANK_SCRIPT,
                "--endpoint",
                endpoint,
                "--world-size",
                str(ranks),
                "--ranks",
                *map(str, group),
                "--records",
                str(records),
                "--rate",
                str(rate),
                "--latency",
                "--wait-go",
                "--result",
                str(result),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for group, result in zip(groups, results, strict=True)
    ]
    # Every process imported, connected and said hello before anyone logs: the latency is
    # the steady state's, not that of 1,024 handshakes on a machine still starting processes.
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a rank process failed to start")
    time.sleep(2.0)
    started = time.monotonic()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    stats: list[dict[str, Any]] = []
    latencies: list[tuple[float, float]] = []  # (seconds since logging began, latency)
    emit_seconds: list[float] = []
    rank_cpu = 0.0
    spies = _profile(collector.pid, procs[0].pid, seconds=profile) if profile else []
    for proc, result in zip(procs, results, strict=True):
        proc.communicate(timeout=900)
        if proc.returncode != 0 or not result.exists():
            stats.append({"error": proc.returncode})
            continue
        data = json.loads(result.read_text())
        stats.extend(data["ranks"])
        latencies.extend(data["latencies"])
        emit_seconds.append(data["emit_seconds"])
        rank_cpu += data["cpu_seconds_logging"]
    exit_code = collector.proc.wait(900)
    for spy in spies:
        spy.wait(60)
    wall = time.monotonic() - started
    sampler.finish()
    log = collector.log()
    total = ranks * records
    files = list(output_dir.glob(_common.JSONL_FILES))
    lines = sum(_count(path) for path in files)
    all_latencies = sorted(latency for _, latency in latencies)
    # After the first quarter of the run: each rank's first record also opens its JSONL file.
    settled = sorted(latency for at, latency in latencies if at >= seconds / 4)
    samples = sampler.samples
    cpu_s = (samples[-1]["cpu_ticks"] - samples[0]["cpu_ticks"]) / _common.CLOCK_TICKS
    span = samples[-1]["t"] - samples[0]["t"]
    warm = samples[len(samples) // 4]["rss_kib"]
    peak = max(s["rss_kib"] for s in samples[len(samples) // 4 :])
    return {
        "ranks": ranks,
        "processes": len(procs),
        "records_per_rank": records,
        "rate_per_rank": rate,
        "records": total,
        "accepted": _common.accepted(log),
        "jsonl_files": len(files),
        "jsonl_lines": lines,
        "lost": total - lines,
        "rank_dropped": sum(int(s.get("dropped", 0)) for s in stats),
        "rank_held": sum(int(s.get("held", 0)) for s in stats),
        "errors": [s for s in stats if "error" in s],
        "collector_exit": exit_code,
        "wall_s": wall,
        "slowest_rank_process_emit_s": max(emit_seconds, default=float("nan")),
        "ack_latency_ms": _latency_ms(all_latencies),
        "ack_latency_after_first_quarter_ms": _latency_ms(settled),
        "collector_cpu_cores": cpu_s / span if span else float("nan"),
        # While logging (from the start signal to the last record, before close()).
        "rank_processes_cpu_cores": rank_cpu / max(emit_seconds, default=float("nan")),
        "rss_start_mib": samples[0]["rss_kib"] / 1024,
        "rss_warm_mib": warm / 1024,
        "rss_peak_after_warm_mib": peak / 1024,
        "rss_end_mib": samples[-1]["rss_kib"] / 1024,
    }


def _profile(collector_pid: int, rank_pid: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("--profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return []
    _common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--threads",
                "--format",
                "raw",
                "--rate",
                "100",
                "--duration",
                str(max(1, round(seconds))),
                "--output",
                str(_common.RESULTS_DIR / f"scale-profile-{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in (("collector", collector_pid), ("rank-process", rank_pid))
    ]


def _latency_ms(ordered: list[float]) -> dict[str, float]:
    return {
        "n": len(ordered),
        "p50": 1000 * _common.percentile(ordered, 50),
        "p99": 1000 * _common.percentile(ordered, 99),
        "p999": 1000 * _common.percentile(ordered, 99.9),
        "max": 1000 * ordered[-1] if ordered else float("nan"),
    }


def _count(path: Path) -> int:
    with open(path, "rb") as data:
        return data.read().count(b"\n")


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    lat = r["ack_latency_ms"]
    settled = r["ack_latency_after_first_quarter_ms"]
    lost = r["lost"] or r["rank_dropped"] or r["rank_held"] or r["accepted"] != r["records"]
    _common.print_table(
        f"{r['ranks']} ranks in {r['processes']} processes, {args.rate:g} records/s each, "
        f"{args.seconds:g} s, one collector (JSONL)",
        ["records", "lost", "ack p50 ms", "ack p99 ms", "ack max ms", "p50 / p99 after 1st 25%",
         "collector CPU cores", "RSS warm MiB", "RSS peak MiB", "ranks' CPU cores", "exit"],
        [[r["records"], "0" if not lost else _describe_loss(r), lat["p50"], lat["p99"],
          lat["max"], f"{settled['p50']:,.1f} / {settled['p99']:,.1f}",
          r["collector_cpu_cores"], r["rss_warm_mib"], r["rss_peak_after_warm_mib"],
          r["rank_processes_cpu_cores"], r["collector_exit"]]],
    )  # fmt: skip
    _common.write_results("scale", r)


def _describe_loss(r: dict[str, Any]) -> str:
    return (
        f"lines {r['jsonl_lines']}/{r['records']}, accepted {r['accepted']}, "
        f"rank dropped {r['rank_dropped']}, held {r['rank_held']}"
    )


if __name__ == "__main__":
    sys.exit(main())
