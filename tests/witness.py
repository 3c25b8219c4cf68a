"""What the integration jobs share: their second account of what they logged (one JSON line
per logged step, per rank, written by the job itself, not through ranklog), and a try at
building their adapter with a misspelled setting."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ranklog import ConfigError


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


def try_misspelled(adapter: Any, spec: Mapping[str, Any]) -> None:
    """Build ``adapter`` with ``spec["misspelled"]`` (if given) and print the one line it
    raises, as a user would see it before training starts."""
    if "misspelled" not in spec:
        return
    try:
        adapter(**spec["misspelled"])
    except ConfigError as exc:
        print(f"ConfigError: {exc}", flush=True)
    else:
        print(f"{adapter.__name__} took {spec['misspelled']}", flush=True)
