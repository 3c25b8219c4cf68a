"""What W&B can hold: a row's values made loggable before ``run.log`` sees them.

``run.log`` encodes a whole row at once, so one value it cannot encode (``bytes`` that are
not UTF-8, an arbitrary object) raises there and costs the row's other values too. Here each
value W&B cannot encode becomes its text (``bytes``) or its ``repr`` (anything else), with
one warning per key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

#: Values ``run.log`` always takes (the common case: checked by type only).
_PLAIN = (bool, int, float, str, type(None))

Report = Callable[..., object]  # ReportOnce: (kind, message, *args)


def loggable(flat: dict[str, Any], report: Report) -> dict[str, Any]:
    """``flat`` with every value W&B cannot encode replaced by its text."""
    odd = [key for key, value in flat.items() if not isinstance(value, _PLAIN)]
    if not odd:
        return flat
    out = dict(flat)
    for key in odd:
        value = out[key]
        if _encodes(value):
            continue
        out[key] = _as_text(value)
        report(
            f"odd:{key}",
            "backend wandb: %r is a %s, which W&B cannot hold; logged as its text",
            key,
            type(value).__name__,
        )
    return out


def _encodes(value: Any) -> bool:
    """Whether W&B's history encoding takes ``value`` without a fault (its media types
    always do). It is tried the way wandb encodes: pydantic-core with wandb's history
    encoder as the fallback; a value that fails there makes wandb log a traceback, even if
    its stdlib retry then succeeds."""
    from wandb.sdk.data_types.base_types.wb_value import WBValue
    from wandb.util import WandBHistoryJSONEncoder

    if isinstance(value, WBValue):
        return True
    fallback = WandBHistoryJSONEncoder().default
    try:
        import pydantic_core

        pydantic_core.to_json(value, inf_nan_mode="constants", fallback=fallback)
    except ImportError:  # a wandb without pydantic-core encodes with the stdlib
        return _stdlib_encodes(value, fallback)
    except Exception:  # invalid UTF-8, an object no encoder knows...: not this value
        return False
    return True


def _stdlib_encodes(value: Any, fallback: Callable[[Any], Any]) -> bool:
    try:
        json.dumps(value, default=fallback)
    except Exception:
        return False
    return True


def _as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return repr(bytes(value))
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
