"""A rank process for integration tests: logs N step records through ZMQSocketHandler.

    python -m tests.rank_worker --endpoint tcp://127.0.0.1:5555 --rank 0 --world-size 4 \
        --records 3000 [--rate 1000] [--tag t] [--close-timeout 30] [--metrics 16] [--run-id test]
        [--special-values] [--step-delay 0.1] [--sleep-at 50:15] [--shutdown] [--say-steps]
        [--close-limit 300] [--silence-warning 15] [--system-interval 0.5] [--spill-dir D]
        [--curve-server-key collector.key --curve-key-file me.key_secret]

Without ``--endpoint`` the handler takes ``RANKLOG_ENDPOINT`` (or the derived address).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

from ranklog import IsMappingFilter, ZMQSocketHandler
from ranklog.rank.sender import SenderSettings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", default=None)
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
    parser.add_argument("--close-limit", type=float, default=300.0)
    parser.add_argument("--silence-warning", type=float, default=15.0)
    parser.add_argument(
        "--system-interval", type=float, default=None, help="sample system metrics this often"
    )
    parser.add_argument("--spill-dir", default=None)
    parser.add_argument("--curve-server-key", default=None, help="the collector's public key")
    parser.add_argument("--curve-key-file", default=None, help="this rank's .key_secret")
    parser.add_argument(
        "--shutdown", action="store_true", help="end with logging.shutdown(), as at exit"
    )
    parser.add_argument("--say-steps", action="store_true", help="'logged step N' on stderr")
    args = parser.parse_args()
    sleep_step, sleep_for = map(float, args.sleep_at.split(":")) if args.sleep_at else (-1, 0)

    handler = ZMQSocketHandler(
        args.endpoint,
        rank=args.rank,
        world_size=args.world_size,
        close_timeout=args.close_timeout,
        close_limit=args.close_limit,
        run_id=args.run_id,
        settings=SenderSettings(silence_warning=args.silence_warning),
        spill_dir=args.spill_dir,
        system_metrics=args.system_interval is not None,
        system_interval=args.system_interval,
        curve_server_key=args.curve_server_key,
        curve_key_file=args.curve_key_file,
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
                **{f"m{index}": step + index / 100 for index in range(args.metrics)},
            },
            extra={"step": step},
        )
        if args.say_steps:
            print(f"logged step {step}", file=sys.stderr, flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
        if step == sleep_step:
            time.sleep(sleep_for)
        if args.rate:
            delay = started + (i + 1) / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    closing = time.monotonic()
    if args.shutdown:
        logging.shutdown()
    else:
        handler.close()
    close_s = round(time.monotonic() - closing, 3)
    print(json.dumps({"rank": args.rank, **handler.stats, "close_s": close_s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
