"""Read a W&B offline run back from disk, as ``wandb sync`` would: its name, config and
history rows, from the ``.wandb`` transaction log (decoded by ``ranklog.backends.wandb_log``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ranklog.backends.wandb_log import records


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class WandbRun:
    """What a user sees of an offline run: its name, config and history rows."""

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def read_run(run_dir: Path) -> WandbRun:
    """Read ``<dir>/wandb/offline-run-*/`` (the folder holding ``run-<id>.wandb``)."""
    (log_file,) = run_dir.glob("run-*.wandb")
    run = WandbRun(log_file)
    for record in records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.name = record.run.display_name
            run.project = record.run.project
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "history":
            run.history.append(
                {_key(item): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "exit":
            run.finished = True
    run.config.pop("_wandb", None)
    return run


def offline_runs(log_dir: Path) -> list[Path]:
    """The offline run folders W&B wrote under ``log_dir`` (``dir=log_dir``)."""
    return sorted((log_dir / "wandb").glob("offline-run-*"))
