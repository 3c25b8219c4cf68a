"""GPU training-step time: no logging, ``.item()`` every step, or the CUDA tensors to ranklog.

A small MLP trained with AdamW on one CUDA device; every step logs ``loss`` and
``grad_norm`` through ``ZMQSocketHandler`` to a live ``ranklog collect`` subprocess (JSONL):

* ``none``: no logging, the baseline;
* ``item``: ``loss.item()`` and ``grad_norm.item()`` in the training loop, as most loops
  do: each is a host sync, so the CPU stops queueing work until the GPU caught up;
* ``tensor``: the CUDA tensors themselves; ranklog copies them to pinned host memory
  without waiting and the sender thread reads them once the copy's CUDA event completed.

The modes take turns in rounds. Step time is wall time over a round (the device synchronized
at both ends) divided by its steps; "CPU step" is the time the Python loop spent per step,
which a host sync stretches to the GPU's pace. Each mode's records are counted in the
collector's JSONL afterwards.

    .venv/bin/python bench/gpu_step.py                    # needs a CUDA device
    .venv/bin/python bench/gpu_step.py --steps 500 --width 4096 --depth 8 --batch 256

Skips (exit 0, with the reason on stderr) when no CUDA device exists; under
``RANKLOG_REQUIRE_CUDA=1`` that is a failure (exit 1). Writes
``bench/results/gpu_step.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

MODES = ("none", "item", "tensor")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--device", default="cuda", help="cuda (or cuda:N); 'cpu' only checks that the script runs"
    )
    args = parser.parse_args()  # fmt: skip

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        # A skip, not a failure, unless RANKLOG_REQUIRE_CUDA=1 (a GPU runner): `make gpu-check`
        # runs everywhere and measures where it can.
        required = os.environ.get("RANKLOG_REQUIRE_CUDA") == "1"
        print(
            f"bench/gpu_step.py {'failed (RANKLOG_REQUIRE_CUDA=1)' if required else 'skipped'}: "
            "no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return 1 if required else 0
    device = torch.device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="ranklog-bench-gpu-"))
    collector = _common.start_collector(workdir / "collector", "--logger-type", "async")
    try:
        results = run(args, torch, device, collector.endpoint)
    finally:
        exit_code = collector.stop()
    lines = _count_lines(collector.output_dir / "training_params_and_metrics_global0.jsonl")
    report(args, results, device, torch, lines, exit_code)
    return 0


def run(args: argparse.Namespace, torch: Any, device: Any, endpoint: str) -> dict[str, Any]:
    from ranklog import ZMQSocketHandler

    torch.manual_seed(0)
    layers: list[Any] = []
    for _ in range(args.depth):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(args.width, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = torch.randn(args.batch, args.width, device=device)
    targets = torch.randn(args.batch, 1, device=device)

    handler = ZMQSocketHandler(endpoint, rank=0, world_size=1, run_id="bench-gpu")
    handler.start()
    logger = logging.getLogger("instructlab.training.metrics")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    step = 0

    def train_steps(mode: str, count: int) -> list[float]:
        nonlocal step
        cpu_times = []
        for _ in range(count):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if mode == "item":
                logger.info(
                    {"loss": loss.item(), "grad_norm": grad_norm.item()}, extra={"step": step}
                )
            elif mode == "tensor":
                logger.info({"loss": loss.detach(), "grad_norm": grad_norm}, extra={"step": step})
            step += 1
            cpu_times.append(time.perf_counter() - started)
        return cpu_times

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for mode in MODES:  # compile kernels, fill the caching allocators, connect
        train_steps(mode, args.warmup)
    synchronize()
    handler.flush()

    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    logged = {mode: 0 for mode in MODES}
    for round_index in range(args.rounds):
        order = MODES[round_index % 3 :] + MODES[: round_index % 3]
        for mode in order:
            synchronize()
            started = time.perf_counter()
            cpu[mode] += train_steps(mode, args.steps)
            synchronize()
            wall[mode].append((time.perf_counter() - started) / args.steps)
            logged[mode] += args.steps if mode != "none" else 0
            handler.flush()  # outside the timing: the sender drains between rounds
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    stats = dict(handler.stats)
    handler.close()
    return {
        mode: {
            "step_ms": 1000 * statistics.mean(wall[mode]),
            "round_step_ms": [1000 * value for value in wall[mode]],
            "cpu_step_median_ms": 1000 * statistics.median(cpu[mode]),
            "cpu_step_p99_ms": 1000 * _common.percentile(sorted(cpu[mode]), 99),
            "records_logged": logged[mode],
        }
        for mode in MODES
    } | {"handler_stats": stats, "warmup_records": 2 * args.warmup, "total_steps": step}


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as lines:
        return sum(1 for _ in lines)


def report(
    args: argparse.Namespace,
    results: dict[str, Any],
    device: Any,
    torch: Any,
    lines: int,
    collector_exit: int,
) -> None:
    base = results["none"]["step_ms"]
    rows = [
        [
            mode,
            results[mode]["step_ms"],
            f"{100 * (results[mode]['step_ms'] / base - 1):+.1f}%",
            results[mode]["cpu_step_median_ms"],
            results[mode]["cpu_step_p99_ms"],
        ]
        for mode in MODES
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    _common.print_table(
        f"Training step on {name}: MLP {args.depth}x{args.width}, batch {args.batch}, "
        f"{args.rounds} rounds of {args.steps} steps per mode",
        ["logging", "step ms", "vs none", "CPU step median ms", "CPU step p99 ms"],
        rows,
    )
    expected = results["warmup_records"] + sum(results[m]["records_logged"] for m in MODES)
    print(f"records logged {expected:,}, JSONL lines {lines:,}, collector exit {collector_exit}, "
          f"handler {results['handler_stats']}")  # fmt: skip
    _common.write_results(
        "gpu_step",
        {
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "model": {"depth": args.depth, "width": args.width, "batch": args.batch},
            "modes": {mode: results[mode] for mode in MODES},
            "records_logged": expected,
            "jsonl_lines": lines,
            "collector_exit": collector_exit,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
