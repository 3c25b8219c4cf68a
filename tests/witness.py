"""The jobs' second account of what they logged: one JSON line per logged step, per rank,
written by the job itself (not through ranklog)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def note(folder: str, rank: int, step: int | None, values: Mapping[str, Any] | None) -> None:
    path = Path(folder) / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps({"step": step, "keys": sorted(values or {})}) + "\n")


def noted(folder: Path, rank: int) -> list[dict[str, Any]]:
    path = folder / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
