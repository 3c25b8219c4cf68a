"""Constructor arguments of the built-in backends: InstructLab's, and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def reject_unknown(handler: str, unknown: Mapping[str, Any], expected: str) -> None:
    """A TypeError naming the arguments ``handler`` does not take (if any), and what it
    does take besides ``level``, ``run_name`` and ``log_dir``."""
    if unknown:
        raise TypeError(
            f"{handler} got unsupported argument(s) {', '.join(unknown)}; expected {expected}"
        )
