"""The demo trainer: a small MLP on synthetic regression data, gloo on CPU, one loss per step.

It takes InstructLab's ``--logger_type``, ``--run_name`` and ``--output_dir`` flags and logs
through :func:`ranklog.setup_metric_logger`; rank 0's embedded collector writes the backends.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ranklog import finish_metric_logger, setup_metric_logger

METRICS = logging.getLogger("instructlab.training.metrics")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ranklog demo trainer (run under torchrun)")
    parser.add_argument("--output_dir", "--output-dir", default="demo-output")
    parser.add_argument("--logger_type", "--logger-type", default="async")
    parser.add_argument("--run_name", "--run-name", default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--step_delay",
        type=float,
        default=0.0,
        help="seconds to sleep per step (to stretch a run for fault tests)",
    )
    return parser.parse_args(argv)


def _train(args: argparse.Namespace, rank: int, world_size: int) -> None:
    torch.manual_seed(1234 + rank)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    true_weights = torch.linspace(-1, 1, 16).unsqueeze(1)
    METRICS.info(
        {
            "lr": args.lr,
            "batch_size": args.batch_size,
            "world_size": world_size,
            "model": {"hidden": 64, "layers": 2},
        },
        extra={"hparams": True},
    )
    for step in range(args.steps):
        started = time.perf_counter()
        x = torch.randn(args.batch_size, 16)
        y = x @ true_weights + 0.1 * torch.randn(args.batch_size, 1)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        # A 0-d CPU tensor goes in as is: the handler turns it into a number.
        METRICS.info(
            {
                "loss": loss.detach(),
                "global_loss": global_loss / world_size,
                "grad": {"norm": grad_norm},
                "step_time_ms": 1000 * (time.perf_counter() - started),
            },
            extra={"step": step},
        )
        if args.step_delay:
            time.sleep(args.step_delay)


def _show_output(output_dir: Path, loggers: str) -> None:
    print(f"\nranklog demo finished; output in {output_dir.resolve()}")
    for path in sorted(output_dir.glob("training_params_and_metrics_global*.jsonl")):
        lines = path.read_text().splitlines()
        print(f"  {path.name}: {len(lines)} lines, e.g.")
        for line in lines[1:3]:
            print(f"    {line}")
    if "tensorboard" in loggers:
        print(f"  look at it with: tensorboard --logdir {output_dir.resolve()}")
    if "wandb" in loggers:
        print(
            f"  W&B offline run under {(output_dir / 'wandb').resolve()} (upload with `wandb sync`)"
        )
    print(f"  collector log: {(output_dir / 'ranklog-collector.log').resolve()}")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    # W&B runs offline unless the user configured otherwise: the demo needs no account.
    os.environ.setdefault("WANDB_MODE", "offline")
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    setup_metric_logger(args.logger_type, args.run_name, args.output_dir)
    try:
        _train(args, rank, world_size)
    finally:
        exit_code = finish_metric_logger(timeout=120)
        dist.destroy_process_group()
    if exit_code not in (None, 0):
        print(f"ranklog collector exited with {exit_code}; see its log in {args.output_dir}")
        return 1
    if exit_code == 0:
        _show_output(Path(args.output_dir), args.logger_type)
    return 0
