"""Summarise a py-spy ``--format raw`` profile: per thread, the functions with the most
samples (inclusive and self).

    .venv/bin/python bench/profile_report.py bench/results/collector-profile-async-burst.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match.group("file").rsplit("/", 1)[-1]
    return f"{match.group('func')} ({file})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    own: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    with open(args.path) as lines:
        for line in lines:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            thread = frames[0].strip()
            names = [_name(frame) for frame in frames[1:]]
            totals[thread] += count
            for name in set(names):
                inclusive[thread][name] += count
            if names:
                own[thread][names[-1]] += count
    grand = sum(totals.values())
    for thread, total in totals.most_common():
        print(f"\n## {thread}: {total} samples ({100 * total / grand:.0f}% of all)")
        print(f"{'inclusive':>9} {'self':>6}  function")
        for name, count in inclusive[thread].most_common(args.top):
            print(f"{100 * count / total:8.1f}% {100 * own[thread][name] / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
