"""A torchrun job for tests/test_supervise.py, logging until the test says stop.

    torchrun --standalone --nproc-per-node 2 tests/supervise_job.py OUTPUT_DIR

Every rank logs ``{"loss": ...}`` at step 0, 1, ... every 10 ms until ``OUTPUT_DIR/stop``
exists, prints ``logged <rank> <steps>`` and finishes.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ranklog import finish_metric_logger, setup_metric_logger


def main(out: Path) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    setup_metric_logger("async,tensorboard", "supervised", str(out))
    metrics = logging.getLogger("instructlab.training.metrics")
    step = 0
    while not (out / "stop").exists():
        metrics.info({"loss": 1.0 / (step + 1) + rank}, extra={"step": step})
        step += 1
        time.sleep(0.01)
    # One write: under PYTHONUNBUFFERED, print writes the line and its newline apart, and
    # the two ranks' lines interleaved in the job's shared stdout ("logged 0 371logged 1").
    sys.stdout.write(f"logged {rank} {step}\n")
    sys.stdout.flush()
    code = finish_metric_logger(timeout=60)
    dist.destroy_process_group()
    return 0 if code in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
