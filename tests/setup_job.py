"""A torchrun job that calls ``setup_metric_logger`` the way a user's script would.

    torchrun --standalone --nproc-per-node 2 tests/setup_job.py '<json>'

The JSON holds ``args`` (positional) and ``kwargs`` for ``setup_metric_logger``, ``env``
(variables the script itself sets before setup) and ``steps`` (default 20); each rank then
logs ``{"loss": ...}`` per step, sleeping ``step_delay`` seconds (default 0) after each.
``fail_rank``: that rank exits with an error before its setup (a script that fails early).
``logger``: the logger the script logs to (default ``instructlab.training.metrics``, where
setup attaches ranklog). ``all_reduce``: each step ends in an all_reduce, as a DDP step
does. ``sleep``: ``{"step": S, "seconds": T, "rank": R}`` sleeps T seconds inside step S
before its all_reduce, on rank R (every rank where R is absent: an evaluation or a
checkpoint save).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from ranklog import finish_metric_logger, setup_metric_logger


def main() -> int:
    spec = json.loads(sys.argv[1])
    os.environ.update(spec.get("env", {}))  # settings a user makes in the training script
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == spec.get("fail_rank"):
        time.sleep(2)  # rank 0 starts the collector meanwhile
        raise SystemExit(f"rank {rank} fails on purpose before its setup")
    setup_metric_logger(*spec.get("args", []), **spec.get("kwargs", {}))
    metrics = logging.getLogger(spec.get("logger", "instructlab.training.metrics"))
    metrics.info({"lr": 0.1}, extra={"hparams": True})
    sleep = spec.get("sleep", {})
    for step in range(spec.get("steps", 20)):
        if step == sleep.get("step") and sleep.get("rank", rank) == rank:
            time.sleep(sleep["seconds"])
        if spec.get("all_reduce"):
            dist.all_reduce(torch.ones(1))
        metrics.info(
            {"loss": 1.0 / (step + 1) + rank, **spec.get("also", {})}, extra={"step": step}
        )
        time.sleep(spec.get("step_delay", 0))
    code = finish_metric_logger(timeout=120)
    dist.destroy_process_group()
    return 0 if code in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
