"""A backend's checkpoint file (``.ranklog/backend-<name>.json``): how far it got.

    {"offset": <journal position read through>,
     "backend": <the handler's own state, e.g. {"files": {path: size}}>,
     "policy": {"state": ..., "held": [<entry starts>], "remember_from": <entry start>},
     "history": [{"offset": ..., "policy": ...}, ...]}   # earlier ones, newest first

Written atomically and fsynced, after the files it lists; a restart cuts the backend's files
back to the sizes here and reads the journal on from ``offset``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ranklog.durable import fsync_directory, write_durably

if TYPE_CHECKING:
    from ranklog.backends.policies import RankPolicy

_log = logging.getLogger(__name__)
_HISTORY = 32  # earlier checkpoints kept (about as many seconds)


def load(path: Path, backend: str, paths: Iterable[str] = ()) -> dict[str, Any] | None:
    """The saved checkpoint (``{"offset": 0}`` if none); None if it cannot be read.
    ``paths``: the keys of the handler's state that name paths, besides ``files``."""
    if not path.exists():
        return {"offset": 0}
    try:
        saved = json.loads(path.read_text())
        int(saved["offset"])
        base = _output_dir(path)
        return _with_paths(saved, lambda name: os.path.join(base, name), paths)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        _log.warning("backend %s: checkpoint %s unreadable (%s)", backend, path, exc)
        return None


def save(path: Path, state: dict[str, Any], paths: Iterable[str] = ()) -> None:
    """Replace the checkpoint atomically; an OSError (a full disk) reaches the caller.

    Files and folders in the output dir (``files`` and the state keys in ``paths``) are
    listed relative to it: a copied or moved output dir (or ``ranklog replay`` from
    elsewhere) resumes with its own files and run folders, never the original's."""
    _make_durable(((state.get("backend") or {}).get("files") or {}).keys())
    base = _output_dir(path)
    state = _with_paths(state, lambda name: _relative_inside(name, base), paths)
    write_durably(path, json.dumps(state).encode())


def _make_durable(files: Iterable[str]) -> None:
    """fsync the files a checkpoint lists, and their folders, before it says how much they
    hold: after a power cut a file shorter than its checkpoint costs a rebuild from the
    journal's start, and the journal before ``--journal-retention`` is gone by then."""
    folders = set()
    for name in files:
        try:
            fd = os.open(name, os.O_RDONLY)
        except FileNotFoundError:  # listed as empty, deleted by a rebuild
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(os.path.dirname(os.path.abspath(name)))
    for folder in folders:
        fsync_directory(Path(folder))


def _output_dir(checkpoint_path: Path) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))


def _relative_inside(name: str, base: str) -> str:
    relative = os.path.relpath(name, base) if os.path.isabs(name) else name
    return name if relative.startswith(os.pardir) else relative


def _with_paths(
    state: dict[str, Any], rename: Callable[[str], str], keys: Iterable[str]
) -> dict[str, Any]:
    """``state`` with the paths in its handler state passed through ``rename``: the names
    of ``files``, and each key in ``keys`` (a path, or a mapping to paths)."""
    backend = state.get("backend")
    if not backend:
        return state
    out = dict(backend)
    if backend.get("files"):
        out["files"] = {rename(name): size for name, size in backend["files"].items()}
    for key in keys:
        value = backend.get(key)
        if isinstance(value, str):
            out[key] = rename(value)
        elif isinstance(value, dict):
            out[key] = {k: rename(v) if isinstance(v, str) else v for k, v in value.items()}
    return {**state, "backend": out}


def needed_from(saved: dict[str, Any]) -> int:
    """The lowest journal offset a backend resuming from ``saved`` may read again: its
    position, the records its policy holds or remembers, and those of the earlier
    checkpoints it may go back to (W&B). The journal before it may be deleted."""
    offsets = []
    for past in [saved, *saved.get("history", [])]:
        offsets.append(int(past["offset"]))
        policy = past.get("policy") or {}
        offsets.extend(int(start) for start in policy.get("held", ()))
        if policy.get("remember_from") is not None:
            offsets.append(int(policy["remember_from"]))
    return min(offsets)


def next_state(
    last: dict[str, Any] | None,
    offset: int,
    backend: dict[str, Any] | None,
    policy: RankPolicy | None,
) -> dict[str, Any]:
    """The checkpoint to save after ``last``: read through ``offset``, the handler's own
    ``backend`` state (None if it keeps none) merged over the last one, and the policy's."""
    last = last or {}
    state: dict[str, Any] = {
        "offset": offset,
        "backend": None if backend is None else merged(last.get("backend"), backend),
        "policy": None
        if policy is None
        else {
            "state": policy.checkpoint(),
            "held": policy.held_starts(),
            "remember_from": policy.remember_from(),
        },
    }
    if policy is not None:
        # Earlier positions with their policy states: for a backend that turns out, after a
        # crash, to have got less far than its last checkpoint (W&B).
        history = last.get("history", [])
        if last.get("offset") != offset and "policy" in last:
            history = [{"offset": last["offset"], "policy": last["policy"]}, *history]
        state["history"] = history[:_HISTORY]
    return state


def policy_at(saved: dict[str, Any], offset: int) -> tuple[int, Any]:
    """Where to resume, and the policy state to resume with, when the backend itself only
    got as far as ``offset`` (W&B writes asynchronously): the newest checkpoint at or
    before it, or the journal's start with a fresh policy."""
    for past in [saved, *saved.get("history", [])]:
        if int(past["offset"]) <= offset:
            return int(past["offset"]), past.get("policy")
    return 0, None


def merged(
    last: dict[str, Any] | None, now: dict[str, Any], *, opened: bool = False
) -> dict[str, Any]:
    """A handler's state now, keeping what it does not report again yet: files restored
    but not reopened since a restart, a W&B run not resumed yet (until a file is opened
    nothing is written to it, so its last size still holds).

    ``opened``: the handler just opened a file or run, in the middle of writing; the files
    the last checkpoint lists keep their sizes there (what a restart must cut back to) and
    only new ones come from ``now``."""
    out = {**(last or {}), **{key: value for key, value in now.items() if key != "files"}}
    if "files" in (last or {}) or "files" in now:
        older, newer = (now, last or {}) if opened else (last or {}, now)
        out["files"] = {**older.get("files", {}), **newer.get("files", {})}
    return out


def emptied(backend_state: dict[str, Any] | None) -> dict[str, Any] | None:
    """For a rebuild from the journal's start: every known file, cut back to nothing."""
    files = (backend_state or {}).get("files")
    return {"files": dict.fromkeys(files, 0)} if files else None


def shortened_file(backend_state: dict[str, Any] | None) -> str | None:
    """A file the checkpoint lists that is now missing or shorter than it was then (one it
    lists as empty may be gone: a rebuild deletes what it starts again)."""
    for path, size in ((backend_state or {}).get("files") or {}).items():
        if size and (not os.path.exists(path) or os.path.getsize(path) < size):
            return str(path)
    return None
