"""Envelopes from LogRecords, packed on the caller's thread (see ``ranklog.wire``)."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from ranklog.rank.identity import RankIdentity
from ranklog.rank.values import DeferredRecord, HostCopy, start_cuda_copy
from ranklog.wire import (
    IDENTITY_FIELDS,
    PROTOCOL_VERSION,
    RECORD,
    RECORD_FIELDS,
    RESERVED_EXTRA_KEYS,
)

_MAX_SANITIZE_DEPTH = 64
_HANDLED_EXTRAS = frozenset({"step", "hparams"})
_NOT_EXTRA = RESERVED_EXTRA_KEYS | _HANDLED_EXTRAS
# The RankIdentity attribute behind each of ranklog.wire's IDENTITY_FIELDS, where the names
# differ; a field the identity lacks fails here, when the encoder is made.
_IDENTITY_ATTRS = {"run": "run_id", "inc": "incarnation"}


class _SlowPath(Exception):
    """Raised inside packing: a value needs the careful path (a device copy, or a repr)."""


def _map_body(fields: dict[str, Any]) -> bytes:
    """``fields`` packed as map entries, without the map header."""
    header: bytes = msgpack.Packer().pack_map_header(len(fields))
    packed: bytes = msgpack.packb(fields)
    return packed[len(header) :]


class RecordEncoder:
    """Builds and packs envelopes for one process identity (caller thread only).

    Values msgpack cannot carry are converted: numpy and torch scalars (and one-element
    CPU tensors) to Python numbers, anything else to its ``repr``; ``converted`` counts the
    ``repr`` fallbacks so they reach the collector. A one-element CUDA tensor is not read
    here: ``host_copy`` starts its copy to host memory and ``record`` returns a
    :class:`DeferredRecord` that the sender thread packs once the copy is done.
    """

    def __init__(
        self,
        identity: RankIdentity,
        *,
        host_copy: Callable[[Any], HostCopy | None] = start_cuda_copy,
    ) -> None:
        self.converted = 0
        self._warned: set[str] = set()  # "repr", "step": each is warned about once
        self._host_copy = host_copy
        self._copies: list[HostCopy] | None = None
        self._identity_fields: dict[str, Any] = {"v": PROTOCOL_VERSION}
        for name in IDENTITY_FIELDS:
            self._identity_fields[name] = getattr(identity, _IDENTITY_ATTRS.get(name, name))
        self._packer = msgpack.Packer(default=self._to_wire)
        # The identity part of every record envelope is packed once: a record packs only its
        # own fields (a map of RECORD_FIELDS entries, so a one-byte header) and is joined
        # behind this head, which carries the header of the whole map.
        fixed = {**self._identity_fields, "kind": RECORD}
        header: bytes = msgpack.Packer().pack_map_header(len(fixed) + len(RECORD_FIELDS))
        self._record_head = header + _map_body(fixed)

    def record(self, seq: int, record: logging.LogRecord) -> bytes | DeferredRecord:
        """Pack one LogRecord as a ``record`` envelope (deferred if it holds CUDA values)."""
        attrs = record.__dict__
        msg: Any = record.msg
        if type(msg) is not dict:
            msg = dict(msg) if isinstance(msg, Mapping) else record.getMessage()
        step = attrs.get("step")
        if step is not None and type(step) is not int:
            step = self._step(step)
        hparams = attrs.get("hparams", False)
        # RECORD_FIELDS, in their order (ranklog.wire.ENVELOPE); a literal is the fastest way
        # to build them, and decode() checks every field against the table in the tests.
        fields = {
            "seq": seq,
            "time": record.created,
            "logger": record.name,
            "level": record.levelno,
            "step": step,
            "hparams": hparams if type(hparams) is bool else bool(hparams),
            "msg": msg,
            # Checking that every attribute is a known one is a fifth of the cost of the scan.
            "extra": {} if _NOT_EXTRA.issuperset(attrs) else _extra(attrs),
        }
        try:
            body: bytes = self._packer.pack(fields)
            return self._record_head + body[1:]
        except (TypeError, ValueError, OverflowError, _SlowPath):
            pass  # rare: odd values or keys, huge ints, cycles, absurd nesting, device values
        copies: list[HostCopy] = []
        self._copies = copies
        try:
            safe = self._sanitize(fields, 0)
        finally:
            self._copies = None
        if copies:
            return DeferredRecord(self._record_head, safe, copies)
        body = self._packer.pack(safe)
        return self._record_head + body[1:]

    def control(self, kind: str, **fields: Any) -> bytes:
        """Pack a hello, heartbeat or goodbye envelope."""
        envelope = {**self._identity_fields, "kind": kind, **fields}
        try:
            packed: bytes = self._packer.pack(envelope)
        except (TypeError, ValueError, OverflowError):
            packed = self._packer.pack(self._sanitize(envelope, 0))
        return packed

    def _step(self, value: Any) -> Any:
        try:
            number = value if isinstance(value, int | float) else self._to_wire(value)
        except _SlowPath:
            copy = self._host_copy(value)
            if copy is not None:
                return copy  # read on the sender thread once on the host, like a metric
            number = None
        if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
            return int(number)
        self.converted += 1
        self._warn_once(
            "step",
            f"ranklog: the step {value!r:.80} is not an integer; records with such a step go "
            "without one (further ones are only counted)",
        )
        return None

    def _to_wire(self, value: Any) -> Any:
        module = type(value).__module__
        if module == "numpy" and getattr(value, "ndim", None) == 0:
            return value.item()
        torch = sys.modules.get("torch") if module.startswith("torch") else None
        tensor = torch is not None and isinstance(value, torch.Tensor)
        if tensor and value.numel() == 1 and not value.is_cuda:
            return value.item()
        if isinstance(value, set | frozenset):
            return list(value)
        if self._copies is None:
            # Inside the packer: anything else takes the slow path, which may defer it.
            raise _SlowPath
        copy = self._host_copy(value)
        if copy is not None:
            self._copies.append(copy)
            return copy
        self.converted += 1
        if tensor and value.device.type != "cpu":
            # repr() would copy the data to the host and wait for the device.
            return f"tensor(shape={list(value.shape)}, dtype={value.dtype}, device={value.device})"
        return repr(value)

    def _sanitize(self, value: Any, depth: int, key: str = "") -> Any:
        if depth > _MAX_SANITIZE_DEPTH:
            self._converted_one(key, value)
            return repr(value)[:256]
        if isinstance(value, Mapping):
            return {
                name: self._sanitize(item, depth + 1, _path(key, name, depth))
                for name, item in (
                    (k if isinstance(k, str) else str(k), v) for k, v in value.items()
                )
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self._sanitize(item, depth + 1, key) for item in value]
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            self._converted_one(key, value)
            return repr(value)
        if value is None or isinstance(value, str | bytes | int | float):
            return value
        if isinstance(value, HostCopy) and self._copies is not None:
            self._copies.append(value)  # a step already on its way to the host
            return value
        before = self.converted
        converted = self._to_wire(value)
        if isinstance(converted, HostCopy):
            return converted
        if self.converted != before:
            self._warn_once("repr", _repr_warning(key, value))
        return self._sanitize(converted, depth + 1, key)

    def _converted_one(self, key: str, value: Any) -> None:
        self.converted += 1
        self._warn_once("repr", _repr_warning(key, value))

    def _warn_once(self, what: str, text: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(text, RuntimeWarning, stacklevel=2)


def _extra(attrs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attrs.items() if key not in _NOT_EXTRA}


def _path(parent: str, name: str, depth: int) -> str:
    """A metric's key as the backends will see it (``train/tokens``); the envelope's own
    fields (``msg``, ``extra``) are not part of it."""
    if depth == 0:
        return "" if name == "msg" else name
    return f"{parent}/{name}" if parent else name


def _repr_warning(key: str, value: Any) -> str:
    return (
        f"ranklog: the value of {key or 'the record'!r} ({type(value).__name__}) cannot be sent "
        "as it is; it goes as its repr (further conversions are only counted)"
    )
