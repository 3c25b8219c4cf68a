"""Rank processes for the tests: `tests/rank_worker.py` run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_rank(
    endpoint: str, rank: int, world_size: int, records: int, *extra: str
) -> subprocess.Popen[str]:
    """One rank logging ``loss = 1/(step+1) + rank`` at steps 0..records-1."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.rank_worker", "--endpoint", endpoint, "--rank", str(rank),
         "--world-size", str(world_size), "--records", str(records), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def start_ranks(
    endpoint: str, world_size: int, records: int, *extra: str
) -> list[subprocess.Popen[str]]:
    """Ranks 0..world_size-1, all alike."""
    return [start_rank(endpoint, r, world_size, records, *extra) for r in range(world_size)]


def finish(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[dict[str, int]]:
    """Wait for every rank; each must exit 0. Returns their final handler stats."""
    stats = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        stats.append(json.loads(out.strip().splitlines()[-1]))
    return stats


def run_ranks(endpoint: str, world_size: int, records: int, *extra: str) -> list[dict[str, int]]:
    """Start the ranks and wait for them (each returns once everything is acknowledged)."""
    return finish(start_ranks(endpoint, world_size, records, *extra))
