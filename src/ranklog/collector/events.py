"""What the collector tells its user: the events file (``.ranklog/events.jsonl``); the status
line is in :mod:`ranklog.collector.stats`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ranklog.journal import STATE_DIR

_log = logging.getLogger(__name__)
# In the state folder: a *.jsonl glob next to the metric files must not pick it up.
EVENTS_FILE = Path(STATE_DIR, "events.jsonl")

Event = tuple[str, dict[str, Any]]  # (name, fields): rank_joined, rank_finished, ...


def event(name: str, **fields: Any) -> Event:
    return name, fields


class EventLog:
    """Appends one JSON line per event: joins, goodbyes, silences, a blocked journal."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / EVENTS_FILE

    def write(self, events: Iterable[Event]) -> None:
        lines = [
            json.dumps({"time": time.time(), "event": name, **fields}) + "\n"
            for name, fields in events
        ]
        if not lines:
            return
        try:
            with open(self.path, "a") as f:
                f.writelines(lines)
        except OSError:
            pass  # each event is in the collector's log too; a full disk must not stop us
