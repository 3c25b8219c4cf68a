"""A rank process for integration tests: logs N step records through ZMQSocketHandler.

    python -m tests.rank_worker --endpoint tcp://127.0.0.1:5555 --rank 0 --world-size 4 \
        --records 3000 [--rate 1000] [--tag t] [--close-timeout 30] [--metrics 16] [--run-id test]
        [--special-values] [--step-delay 0.1] [--sleep-at 50:15]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

from ranklog import IsMappingFilter, ZMQSocketHandler


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--first-step", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0, help="records/s; 0 = no limit")
    parser.add_argument("--tag", default="")
    parser.add_argument("--close-timeout", type=float, default=30.0)
    parser.add_argument("--hparams", action="store_true")
    parser.add_argument("--metrics", type=int, default=0, help="log N metrics per record instead")
    parser.add_argument("--run-id", default="test", help="the job (torchrun's run id)")
    parser.add_argument(
        "--special-values", action="store_true", help="also log nan, inf and -inf each step"
    )
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds slept per step")
    parser.add_argument(
        "--sleep-at", default=None, metavar="STEP:SECONDS", help="sleep once, after that step"
    )
    args = parser.parse_args()
    sleep_step, sleep_for = map(float, args.sleep_at.split(":")) if args.sleep_at else (-1, 0)

    handler = ZMQSocketHandler(
        args.endpoint,
        rank=args.rank,
        world_size=args.world_size,
        close_timeout=args.close_timeout,
        run_id=args.run_id,
    )
    handler.addFilter(IsMappingFilter())
    logger = logging.getLogger("instructlab.training.metrics")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if args.hparams:
        logger.info({"lr": 0.01, "model": {"layers": 2}}, extra={"hparams": True})
    special = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf} if args.special_values else {}
    started = time.monotonic()
    for i in range(args.records):
        step = args.first_step + i
        logger.info(
            {
                "loss": 1.0 / (step + 1) + args.rank,
                "train": {"tokens": step * 10},
                "tag": args.tag,
                **special,
            },
            extra={"step": step},
        )
        if args.step_delay:
            time.sleep(args.step_delay)
        if step == sleep_step:
            time.sleep(sleep_for)
        if args.rate:
            delay = started + (i + 1) / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    handler.close()
    print(json.dumps({"rank": args.rank, **handler.stats}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
