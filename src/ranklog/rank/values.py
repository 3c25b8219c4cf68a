"""Values a rank hands to the handler that msgpack cannot carry as they are: device
tensors on their way to host memory, and the records that wait for them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import msgpack


class HostCopy:
    """A device value on its way to host memory; the sender thread packs it once ``done()``.

    ``buffer`` holds the copy (anything with ``.item()``) and ``done`` says whether the copy
    finished (for CUDA, ``torch.cuda.Event.query``). Reading ``buffer`` before then would
    read garbage; waiting for it on the caller's thread would be the host sync we avoid.
    """

    __slots__ = ("buffer", "done")

    def __init__(self, buffer: Any, done: Callable[[], bool]) -> None:
        self.buffer = buffer
        self.done = done

    def value(self) -> Any:
        return self.buffer.item()


def start_cuda_copy(value: Any) -> HostCopy | None:
    """Start copying a one-element CUDA tensor into pinned host memory; None if not one.

    The copy and the event go on the tensor's device's current stream, after the work that
    produces the value; nothing here waits for the device.
    """
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return None
    if not value.is_cuda or value.numel() != 1:
        return None
    buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    buffer.copy_(value.detach(), non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(value.device))
    return HostCopy(buffer, event.query)


class DeferredRecord:
    """A record envelope waiting for its :class:`HostCopy` values; packed on the sender thread.

    ``result()`` never blocks and never raises: it returns None until every copy is done, then
    the packed envelope (a value that cannot be read is sent as None).
    """

    __slots__ = ("_copies", "_fields", "_head", "data", "nbytes")

    def __init__(self, head: bytes, fields: dict[str, Any], copies: list[HostCopy]) -> None:
        self._head = head
        self._fields: dict[str, Any] | None = fields
        self._copies = copies
        self.data: bytes | None = None
        # The outbox bounds bytes before the values are known; floats pack in 9 bytes.
        self.nbytes = len(head) + len(msgpack.packb(fields, default=_placeholder))

    def result(self) -> bytes | None:
        if self.data is not None or self._fields is None:
            return self.data
        try:
            if not all(copy.done() for copy in self._copies):
                return None
        except Exception:
            pass  # a broken device: send what can be read rather than hold the record forever
        fields = self._fields
        step = fields["step"]
        if isinstance(step, HostCopy):
            fields["step"] = _integral(_read(step))
        self.data = self._head + msgpack.packb(fields, default=_read)[1:]
        self._fields = None
        self._copies = []
        return self.data


def _placeholder(value: Any) -> Any:
    return 0.0


def _read(value: Any) -> Any:
    if isinstance(value, HostCopy):
        try:
            number = value.value()
        except Exception:
            return None
        return number if isinstance(number, bool | int | float) else None
    return None


def _integral(number: Any) -> int | None:
    if type(number) is int:
        return number
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return None
