"""A torchrun job for the signal and full-disk tests: log, wait, burst, wait for the end.

    torchrun --standalone --nproc-per-node 2 tests/signal_job.py '<json>'

The JSON holds ``kwargs`` for ``setup_metric_logger``, and ``dir``, a folder to talk
through. Each rank logs ``before`` steps (default 100) and waits until they are delivered,
then writes ``<dir>/ready<rank>`` (rank 0: the embedded collector's pid in it) and waits for
``<dir>/go``; then it logs ``burst`` more steps at once, writes ``<dir>/burst<rank>``
(``{"logged": N, "held": H}``: H not acknowledged yet) and sleeps until a signal ends it.
With ``own_handler`` (an exit code), the script installs a SIGTERM handler of its own first,
which says ``own handler ran`` and exits with that code. With ``finish``, a rank calls
``finish_metric_logger()`` after the burst instead of sleeping.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import torch.distributed as dist

from ranklog import finish_metric_logger, setup_metric_logger
from ranklog.rank import setup as rank_setup


def main() -> int:
    spec = json.loads(sys.argv[1])
    talk = Path(spec["dir"])
    if "own_handler" in spec:

        def own(number: int, frame: FrameType | None) -> None:
            print("own handler ran", file=sys.stderr, flush=True)
            sys.exit(spec["own_handler"])

        signal.signal(signal.SIGTERM, own)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    handler = setup_metric_logger(**spec.get("kwargs", {}))
    assert handler is not None
    metrics = logging.getLogger("instructlab.training.metrics")
    before, burst = spec.get("before", 100), spec.get("burst", 60_000)
    for step in range(before):
        metrics.info({"loss": 1.0 / (step + 1) + rank}, extra={"step": step})
    handler.flush()
    collector = rank_setup._embedded_collector
    partial = talk / f".ready{rank}"
    partial.write_text(str(collector.proc.pid if collector else ""))
    partial.rename(talk / f"ready{rank}")
    while not (talk / "go").exists():
        time.sleep(0.02)
    for step in range(before, before + burst):
        metrics.info({"loss": 1.0 / (step + 1) + rank}, extra={"step": step})
    held = handler.stats["held"]
    # Written whole, then renamed: the test reads it as soon as the name exists.
    partial = talk / f".burst{rank}"
    partial.write_text(json.dumps({"logged": before + burst, "held": held}))
    partial.rename(talk / f"burst{rank}")
    if spec.get("finish"):
        finish_metric_logger(timeout=120)
        return 0
    while True:
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
