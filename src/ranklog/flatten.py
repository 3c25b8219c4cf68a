"""Nested metric dicts to flat ``a/b`` keys, as InstructLab's backends see them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten_dict(log_dict: Mapping[Any, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into one level, joining keys with ``sep``.

    >>> flatten_dict({"train": {"loss": 0.5}, "lr": 1e-4})
    {'train/loss': 0.5, 'lr': 0.0001}
    """
    flat: dict[str, Any] = {}
    for key, value in log_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, sep=sep, prefix=f"{name}{sep}"))
        else:
            flat[name] = value
    return flat
