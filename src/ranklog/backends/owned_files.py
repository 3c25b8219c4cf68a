"""The files a backend appends to, kept for exactly-once: each one's size when it was first
opened, cutting files back to sizes, and who to tell when a new one is opened.

JSONL and TensorBoard both own files this way; the feed's checkpoints learn of a new file
through :attr:`OwnedFiles.on_open` (``sink.py`` connects it), before anything is written to
it, so that a crash from then on still finds it listed and cut back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any


class OwnedFiles:
    """Each owned file's size when this process first opened it, and the hook to call on
    opening one (None outside the backends' process)."""

    def __init__(self) -> None:
        self.opened_at: dict[str, int] = {}
        self.on_open: Callable[[], None] | None = None

    def opened(self, path: str | None = None, size: int | None = None) -> None:
        """A file (or, with no path, a remote run) was just opened, nothing written to it
        yet: remember its size (``size``, else its size on disk) and say so."""
        if path is not None:
            self.opened_at.setdefault(path, os.path.getsize(path) if size is None else size)
        if self.on_open is not None:
            self.on_open()

    def sizes_at(self, state: Mapping[str, Any] | None) -> dict[str, int]:
        """The size to cut each file back to for a checkpoint's ``state``: its size there,
        or (a file opened since) its size when opened."""
        return {**self.opened_at, **(state or {}).get("files", {})}


def cut_back(sizes: Mapping[str, int]) -> None:
    """Truncate each file of ``sizes`` that is longer than its size there."""
    for path, size in sizes.items():
        if os.path.exists(path) and os.path.getsize(path) > size:
            os.truncate(path, size)
