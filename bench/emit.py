"""Caller cost of one ``logger.info(<16-key metric dict>, extra={"step": s})``.

ranklog's ``ZMQSocketHandler`` (sending to a live ``ranklog collect`` subprocess writing
JSONL) beside the floor of its design, the stdlib and pyzmq alternatives, and in-process
re-implementations of InstructLab's handlers, all in one run. Each call is timed on its own
with ``perf_counter_ns``; the cases take turns in rounds so that drift hits them alike.

    .venv/bin/python bench/emit.py                      # about a minute
    .venv/bin/python bench/emit.py --calls 2000 --only null,floor,ranklog
    .venv/bin/python bench/emit.py --cadence 1ms --switch-interval 0.001

``--cadence`` does about that much other memory-touching Python work between calls (as a
training step does between its logging calls; untimed), so that a sender thread competes
with the caller for the GIL as it does in training; it times NullHandler, the floor and
ranklog only unless ``--only`` says otherwise. ``--switch-interval`` sets
``sys.setswitchinterval`` first.

Prints a table and writes ``bench/results/emit.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import logging.handlers
import queue
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.log.handlers

import _common
import baselines
from ranklog import ZMQSocketHandler

WARMUP_CALLS = 200
CADENCE_CASES = "null,floor,ranklog"
CADENCE_CALLS = 5_000
# The cadence work copies a buffer this big in chunks, as a training step's host side moves
# data through C calls with a little Python between them: the caller's caches go cold, and
# another thread that wants the GIL gets it only between chunks (or inside the next call).
WORK_BYTES = 8 << 20
WORK_CHUNK = 64 << 10


class Cadence:
    """About ``seconds`` of memory-touching work per :meth:`work` call (calibrated)."""

    def __init__(self, seconds: float) -> None:
        self.source = bytearray(WORK_BYTES)
        self.target = bytearray(WORK_BYTES)
        self.offset = 0
        self.chunks = 8
        for _ in range(5):
            started = time.perf_counter()
            self.work()
            took = time.perf_counter() - started
            self.chunks = max(1, round(self.chunks * seconds / took))

    def work(self) -> None:
        source, target, chunk = self.source, self.target, WORK_CHUNK
        offset = self.offset
        for _ in range(self.chunks):
            end = offset + chunk
            target[offset:end] = source[offset:end]
            offset = end % WORK_BYTES
        self.offset = offset


def parse_duration(text: str) -> float:
    """Seconds from ``1ms``, ``500us``, ``0.002s`` or a bare number of seconds."""
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


@dataclass
class Case:
    """One handler under test."""

    name: str
    label: str
    make: Callable[[], logging.Handler]
    calls: int
    settle: Callable[[logging.Handler], None] = lambda handler: None
    handler: logging.Handler | None = None
    logger: logging.Logger | None = None
    samples: list[int] = field(default_factory=list)
    steps: int = 0
    skipped: str | None = None


def _wait_empty(handler: logging.Handler) -> None:
    records = handler.queue  # type: ignore[attr-defined]
    while not records.empty():
        time.sleep(0.001)


def _queue_handler() -> logging.Handler:
    """stdlib QueueHandler with its QueueListener thread handing records to a NullHandler."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = logging.handlers.QueueHandler(records)
    listener = logging.handlers.QueueListener(records, logging.NullHandler())
    listener.start()
    handler.listener = listener  # type: ignore[attr-defined]
    return handler


def _pub_handler(context: zmq.Context[Any], port: int) -> logging.Handler:
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.3)  # the subscription reaches the PUB socket before records do
    return zmq.log.handlers.PUBHandler(pub)


def _ranklog(endpoint: str) -> logging.Handler:
    handler = ZMQSocketHandler(endpoint, rank=0, world_size=1, run_id="bench-emit")
    handler.start()
    return handler


def _flush(handler: logging.Handler) -> None:
    handler.flush()


def _drain_async(handler: logging.Handler) -> None:
    assert isinstance(handler, baselines.InstructLabAsyncJsonlHandler)
    handler.drain()


def build_cases(
    args: argparse.Namespace, workdir: Path, endpoint: str, sinks: dict[str, int]
) -> list[Case]:
    context: zmq.Context[Any] = zmq.Context.instance()
    calls = args.calls
    slow = max(200, calls // 10)
    cases = [
        Case("null", "NullHandler (no handler work)", logging.NullHandler, calls),
        Case(
            "floor",
            "floor: msgpack + ZeroMQ PUSH, non-blocking",
            lambda: baselines.FloorHandler(f"tcp://127.0.0.1:{sinks['pull']}"),
            calls,
        ),
        Case(
            "ranklog",
            "ranklog ZMQSocketHandler -> collector",
            lambda: _ranklog(endpoint),
            calls,
            settle=_flush,
        ),
        Case(
            "queue",
            "stdlib QueueHandler + QueueListener",
            _queue_handler,
            calls,
            settle=_wait_empty,
        ),
        Case(
            "socket",
            "stdlib SocketHandler (pickle, TCP)",
            lambda: logging.handlers.SocketHandler("127.0.0.1", sinks["tcp"]),
            calls,
        ),
        Case("pub", "pyzmq PUBHandler", lambda: _pub_handler(context, sinks["sub"]), calls),
        Case(
            "jsonl_sync",
            "in-process JSONL, synchronous write",
            lambda: baselines.SyncJsonlHandler(workdir / "sync.jsonl"),
            slow * 2,
        ),
        Case(
            "instructlab_async",
            "in-process InstructLab AsyncStructuredHandler",
            lambda: baselines.InstructLabAsyncJsonlHandler(workdir / "async.jsonl"),
            slow * 2,
            settle=_drain_async,
        ),
        Case(
            "wandb",
            "in-process W&B offline (run.log)",
            lambda: baselines.WandbHandler(workdir / "wandb"),
            slow,
            settle=_flush,
        ),
        Case(
            "tensorboard",
            "in-process TensorBoard (torch SummaryWriter)",
            lambda: baselines.TensorBoardHandler(workdir / "tb"),
            max(100, calls // 40),
        ),
    ]
    wanted = set(args.only.split(",")) if args.only else None
    return [case for case in cases if wanted is None or case.name in wanted]


def run_calls(case: Case, count: int, record: bool, cadence: Cadence | None = None) -> None:
    """``count`` timed calls of ``logger.info(metrics, extra={"step": s})``, with the
    cadence's untimed work before each."""
    assert case.logger is not None
    info = case.logger.info
    clock = time.perf_counter_ns
    samples = case.samples
    metrics = _common.metrics
    work = cadence.work if cadence is not None else None
    step = case.steps
    for step in range(case.steps, case.steps + count):
        if work is not None:
            work()
        values = metrics(step)
        start = clock()
        info(values, extra={"step": step})
        elapsed = clock() - start
        if record:
            samples.append(elapsed)
    case.steps = step + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--calls",
        type=int,
        default=None,
        help=f"timed calls per fast case (slow cases take fewer); 20,000, or "
        f"{CADENCE_CALLS:,} with --cadence",
    )
    parser.add_argument("--rounds", type=int, default=5, help="turns each case takes")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument(
        "--cadence",
        type=parse_duration,
        default=None,
        help=f"other Python work between calls, e.g. 1ms (cases: {CADENCE_CASES} unless --only)",
    )
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval (seconds)"
    )
    args = parser.parse_args()  # fmt: skip
    if args.calls is None:
        args.calls = CADENCE_CALLS if args.cadence else 20_000
    if args.cadence and not args.only:
        args.only = CADENCE_CASES
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    cadence = Cadence(args.cadence) if args.cadence else None

    workdir = Path(tempfile.mkdtemp(prefix="ranklog-bench-emit-"))
    collector = _common.start_collector(workdir / "collector", "--logger-type", "async")
    sinks_proc = subprocess.Popen(
        [sys.executable, str(_common.BENCH_DIR / "_sinks.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sinks_proc.stdout is not None
    sinks = json.loads(sinks_proc.stdout.readline())
    cases = build_cases(args, workdir, collector.endpoint, sinks)
    try:
        for case in cases:
            try:
                case.handler = case.make()
            except Exception as exc:  # a baseline whose SDK is missing is skipped, not fatal
                case.skipped = f"{type(exc).__name__}: {exc}"
                print(f"skipping {case.name}: {case.skipped}", file=sys.stderr)
                continue
            case.logger = logging.getLogger(f"bench.emit.{case.name}")
            case.logger.handlers = [case.handler]
            case.logger.propagate = False
            case.logger.setLevel(logging.INFO)
            run_calls(case, WARMUP_CALLS, record=False, cadence=cadence)
            case.settle(case.handler)
        live = [case for case in cases if case.skipped is None]
        for round_index in range(args.rounds):
            # Rotate the order so that no case always follows the same neighbour.
            shift = round_index % len(live)
            for case in live[shift:] + live[:shift]:
                assert case.handler is not None
                share = case.calls // args.rounds
                gc.collect()
                run_calls(case, share, record=True, cadence=cadence)
                case.settle(case.handler)
                time.sleep(0.05)
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for case in cases:
            if case.handler is not None:
                case.handler.close()
                listener = getattr(case.handler, "listener", None)
                if listener is not None:
                    listener.stop()
        collector_exit = collector.stop()
        sinks_proc.kill()
        sinks_proc.wait()
    return report(cases, collector, collector_exit, args.cadence)


def report(
    cases: list[Case], collector: _common.Collector, collector_exit: int, cadence: float | None
) -> int:
    summary = {c.name: _common.summarize_ns(c.samples) for c in cases if c.skipped is None}
    floor = summary.get("floor", {}).get("median_us", float("nan"))
    ours = summary.get("ranklog", {}).get("median_us", float("nan"))
    rows: list[list[Any]] = []
    for case in cases:
        if case.skipped is not None:
            rows.append([case.label, "skipped", "", "", "", "", ""])
            continue
        s = summary[case.name]
        rows.append([
            case.label, s["n"], s["median_us"], s["p99_us"], s["p999_us"],
            s["median_us"] / floor, s["median_us"] / ours,
        ])  # fmt: skip
    pace = (
        "back to back" if cadence is None else f"{cadence * 1e3:g} ms of other work between calls"
    )
    _common.print_table(
        f"Caller cost of logger.info(<16-key dict>, extra={{'step': s}}), microseconds, {pace}, "
        f"switch interval {sys.getswitchinterval() * 1e3:g} ms",
        ["handler", "calls", "median", "p99", "p99.9", "x floor", "x ranklog"],
        rows,
    )
    delivered = _count_lines(collector.output_dir / "training_params_and_metrics_global0.jsonl")
    sent = next((c.steps for c in cases if c.name == "ranklog" and c.skipped is None), 0)
    targets = _targets(summary, cadence)
    if targets:
        _common.print_table(
            "Targets (issue #6)",
            ["target", "measured", "met"],
            [[t["target"], t["measured"], "yes" if t["met"] else "NO"] for t in targets],
        )
    if "floor" in summary and "ranklog" in summary:
        print(f"p99 ratio (ranklog / floor): "
              f"{summary['ranklog']['p99_us'] / summary['floor']['p99_us']:.2f}x; "
              f"median ratio: {ours / floor:.2f}x")  # fmt: skip
    print(f"ranklog records logged {sent:,}, lines the collector wrote {delivered:,} "
          f"(collector exit {collector_exit})")  # fmt: skip
    _common.write_results(
        "emit" if cadence is None else f"emit-cadence-si{sys.getswitchinterval() * 1e3:g}ms",
        {
            "unit": "microseconds per logger.info call",
            "cadence_s": cadence,
            "switch_interval_s": sys.getswitchinterval(),
            "cases": {
                c.name: {"label": c.label, "skipped": c.skipped, **summary.get(c.name, {})}
                for c in cases
            },
            "targets": targets,
            "ranklog_delivery": {"logged": sent, "written": delivered},
        },
    )
    return 0


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as lines:
        return sum(1 for _ in lines)


def _targets(summary: dict[str, dict[str, float]], cadence: float | None) -> list[dict[str, Any]]:
    if "ranklog" not in summary:
        return []
    ours = summary["ranklog"]
    median = ours["median_us"]
    checks: list[tuple[str, str, Callable[[dict[str, float]], float], float, str]]
    if cadence is not None:
        # The tail is where a sender thread holding the GIL shows up.
        checks = [
            ("p99 <= 1.5x floor p99 at cadence", "floor",
             lambda o: ours["p99_us"] / o["p99_us"], 1.5, "<="),
            ("median <= 1.5x floor median at cadence", "floor",
             lambda o: median / o["median_us"], 1.5, "<="),
        ]  # fmt: skip
        return _check(summary, checks)
    checks = [
        ("median <= 1.5x floor median", "floor", lambda o: median / o["median_us"], 1.5, "<="),
        ("median < stdlib QueueHandler median", "queue",
         lambda o: median / o["median_us"], 1.0, "<"),
        ("p99 < 5x own median", "ranklog", lambda o: ours["p99_us"] / median, 5.0, "<"),
        ("W&B offline median >= 10x ours", "wandb",
         lambda o: o["median_us"] / median, 10.0, ">="),
        ("TensorBoard median >= 50x ours", "tensorboard",
         lambda o: o["median_us"] / median, 50.0, ">="),
    ]  # fmt: skip
    return _check(summary, checks)


def _check(
    summary: dict[str, dict[str, float]],
    checks: list[tuple[str, str, Callable[[dict[str, float]], float], float, str]],
) -> list[dict[str, Any]]:
    results = []
    for text, other, ratio_of, bound, op in checks:
        if other not in summary:
            continue
        ratio = ratio_of(summary[other])
        met = {"<=": ratio <= bound, "<": ratio < bound, ">=": ratio >= bound}[op]
        results.append({"target": text, "measured": f"{ratio:.2f}x", "met": met})
    return results


if __name__ == "__main__":
    sys.exit(main())
