"""Run-name placeholders: ``{time}``, ``{utc_time}``, ``{rank}``, ``{local_rank}``."""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_RUN_NAME = "{time}_rank{rank}"
DEFAULT_JSONL_NAME = "training_params_and_metrics_global{rank}"
#: Record attribute set by a rank policy on a record merged from several ranks' records.
MERGED_ATTR = "ranks_merged"


def substitute_placeholders(
    run_name: str | None,
    default_template: str = DEFAULT_RUN_NAME,
    *,
    rank: int | None = None,
    local_rank: int | None = None,
    now: datetime | None = None,
) -> str:
    """Fill InstructLab's run-name placeholders.

    ``rank`` and ``local_rank`` default to the ``RANK`` / ``LOCAL_RANK`` environment
    variables (then 0); in the collector they are the rank the record came from.

    >>> substitute_placeholders("exp_rank{rank}", rank=3)
    'exp_rank3'
    """
    template = default_template if run_name is None else run_name
    now = now or datetime.now()
    values = {
        "{time}": now.isoformat(),
        "{utc_time}": now.astimezone(timezone.utc).isoformat(),
        "{rank}": os.environ.get("RANK", 0) if rank is None else rank,
        "{local_rank}": os.environ.get("LOCAL_RANK", 0) if local_rank is None else local_rank,
    }
    for placeholder, value in values.items():
        template = template.replace(placeholder, str(value))
    return template


def run_name_for(
    run_name: str | None,
    record: logging.LogRecord,
    *,
    now: datetime,
    default_template: str = DEFAULT_RUN_NAME,
) -> str:
    """:func:`substitute_placeholders` with the rank and local rank ``record`` came from (in
    the collector), and ``now`` the time the handler started (or its run did).

    A record a rank policy merged from several ranks' records (:data:`MERGED_ATTR`) stands
    for the job's rank 0: ``{rank}`` and ``{local_rank}`` are 0 for it, whichever rank's
    record came first."""
    merged = getattr(record, MERGED_ATTR, False)
    return substitute_placeholders(
        run_name,
        default_template,
        rank=0 if merged else getattr(record, "rank", None),
        local_rank=0 if merged else getattr(record, "local_rank", None),
        now=now,
    )


def job_suffix(job: object) -> str:
    """``_<job>`` with anything but letters, digits, ``.``, ``-`` and ``_`` made ``_``: what
    tells apart two jobs' runs whose names are otherwise the same."""
    return "_" + re.sub(r"[^A-Za-z0-9._-]", "_", str(job))


def path_inside(log_dir: Path, name: str, suffix: str = "") -> Path:
    """``log_dir / (name + suffix)``; a ValueError if a run name leads outside ``log_dir``
    (``..``, an absolute path)."""
    path = log_dir / f"{name}{suffix}"
    if not path.resolve().is_relative_to(log_dir.resolve()):
        raise ValueError(f"run name {name!r} leads outside {log_dir}")
    return path
