"""What the benchmarks share: a live collector, timing statistics, tables, JSON results.

Not a test helper: benchmarks print a table, write ``bench/results/<name>.json`` (gitignored)
and exit 0 whatever the numbers are; ``docs/performance.md`` records the latest ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
READY = re.compile(r"listening on (\S+)")
RANK_SCRIPT = str(BENCH_DIR / "_rank.py")
JSONL_FILES = "training_params_and_metrics_global*.jsonl"  # the JSONL backend's, one per rank

# The record every benchmark logs: 16 scalar metrics, as a training loop would.
METRIC_KEYS = (
    "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time", "data_time",
    "mem/allocated_gib", "mem/reserved_gib", "mem/max_active_gib", "throughput/tflops",
    "throughput/mfu", "loss/ce", "loss/aux", "batch/tokens", "batch/padding",
)  # fmt: skip


def metrics(step: int) -> dict[str, float]:
    """A fresh 16-key metric dict for ``step``."""
    base = 1.0 / (step + 1)
    return {key: base + index for index, key in enumerate(METRIC_KEYS)}


@dataclass
class Collector:
    """A ``ranklog collect`` subprocess and the endpoint it bound."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    output_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain and exit); kill if it does not exit within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_collector(
    output_dir: Path, *args: str, bind: str = "tcp://127.0.0.1:*", timeout: float = 60.0
) -> Collector:
    """Start ``python -m ranklog collect`` and wait for its ready line.

    Raises ``RuntimeError`` with the collector's output if it exits first (for example
    because a ``--logger-type`` is unknown).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "collector.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ranklog", "collect", "--bind", bind,
             "--output-dir", str(output_dir), *args],
            stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log_path.read_text(errors="replace"))
        if match:
            return Collector(proc, match.group(1), output_dir, log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited ({proc.returncode}):\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"collector never became ready:\n{log_path.read_text()}")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def accepted(log: str) -> int | None:
    """The record count of the collector's final \"collector stopped\" line."""
    for line in reversed(log.splitlines()):
        if "collector stopped:" in line:
            return int(line.split("collector stopped:")[1].split()[0].replace(",", ""))
    return None


class Sampler(threading.Thread):
    """Samples the RSS and CPU time of the collector and its backends' process, and the
    JSONL lines written, every 0.1 s."""

    def __init__(self, pid: int, output_dir: Path, count_lines: bool) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.output_dir = output_dir
        self.count_lines = count_lines
        self.samples: list[dict[str, float]] = []
        self._offsets: dict[Path, int] = {}
        self._lines = 0
        self._ticks: dict[int, int] = {}
        self._done = threading.Event()

    def lines(self) -> int:
        """JSONL lines written so far (reads only what was appended since the last call)."""
        for path in self.output_dir.glob(JSONL_FILES):
            offset = self._offsets.get(path, 0)
            with open(path, "rb") as data:
                data.seek(offset)
                chunk = data.read()
            self._offsets[path] = offset + len(chunk)
            self._lines += chunk.count(b"\n")
        return self._lines

    def run(self) -> None:
        while not self._done.wait(0.1):
            try:
                status = proc_status(self.pid)
            except (OSError, IndexError):
                return  # the collector exited
            if not status["rss_kib"]:
                return  # exiting: no memory map any more
            # A child's CPU time still counts once it exited (the backends' process exits
            # while the collector drains): keep the last reading of every pid.
            self._ticks.update(status["ticks"])
            sample = {"t": time.monotonic(), "rss_kib": status["rss_kib"],
                      "cpu_ticks": sum(self._ticks.values())}  # fmt: skip
            if self.count_lines:
                sample["lines"] = self.lines()
            self.samples.append(sample)

    def finish(self) -> None:
        self._done.set()
        self.join()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def summarize_ns(samples_ns: Sequence[int]) -> dict[str, float]:
    """Median, p99, p99.9, mean and max of per-call times, in microseconds."""
    ordered = sorted(samples_ns)
    us = [value / 1000 for value in ordered]
    return {
        "n": len(us),
        "median_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "p999_us": percentile(us, 99.9),
        "mean_us": sum(us) / len(us),
        "max_us": us[-1],
    }


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the collector runs its backends in a child process)."""
    tree = [pid]
    for member in tree:
        for task in Path(f"/proc/{member}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                tree.extend(int(child) for child in task.read_text().split())
    return tree


def proc_status(pid: int) -> dict[str, Any]:
    """VmRSS (KiB) from /proc/<pid>/status and CPU seconds x100 (ticks) from /proc/<pid>/stat,
    for the process and its descendants: their RSS summed, CPU ticks per pid."""
    rss = 0
    ticks: dict[int, int] = {}
    for member in _process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            if member == pid:
                raise
            continue  # a child that just exited
        # fields[11], fields[12] are utime and stime (the 14th and 15th of the full line).
        ticks[member] = int(fields[11]) + int(fields[12])
    return {"rss_kib": rss, "ticks": ticks}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("ranklog", "pyzmq", "msgpack", "orjson", "torch", "tensorboard", "wandb"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "switch_interval_s": sys.getswitchinterval(),
        "loadavg": _loadavg(),
    }


def _loadavg() -> str | None:
    """Other work on the machine skews every number here; the results say how much there was."""
    try:
        with open("/proc/loadavg") as load:
            return load.read().strip()
    except OSError:
        return None


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a Markdown table."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    text_rows = [[cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in text_rows:
        padded = [
            value.rjust(width) if index else value.ljust(width)
            for index, (value, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(padded) + " |")
    text = f"\n{title}\n\n" + "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine and the command line."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return path
