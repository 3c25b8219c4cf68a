"""Acknowledgements on the rank's side: read from the DEALER socket (on the sender thread)
and told to the outbox, the resend rule and the user's notices."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from ranklog.rank.outbox import Outbox
from ranklog.rank.resend import RefusalNotice, ResendRule, SilenceNotice
from ranklog.wire import ACK


def read_acks(
    sock: zmq.Socket[Any],
    incarnation: str,
    outbox: Outbox,
    resend: ResendRule,
    silence: SilenceNotice,
    refusal: RefusalNotice,
) -> None:
    """Take every acknowledgement waiting on ``sock`` for ``incarnation``."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        for frame in frames:
            ack = _ack_of(frame, incarnation)
            if ack is None:
                continue
            seq, got = ack
            advanced = outbox.ack(seq)
            refused = got is not None and got > seq
            resend.heard(time.monotonic(), advanced=advanced, refused=refused)
            silence.heard()
            if refused:
                refusal.refused()
            elif advanced:
                refusal.kept()


def _ack_of(frame: bytes, incarnation: str) -> tuple[int, int | None] | None:
    """``(seq, got)`` of an acknowledgement for ``incarnation``; None for anything else."""
    try:
        ack = msgpack.unpackb(frame, raw=False)
    except Exception:
        return None
    if not (
        isinstance(ack, dict)
        and ack.get("kind") == ACK
        and ack.get("inc") == incarnation
        and type(ack.get("seq")) is int
    ):
        return None
    got = ack.get("got")
    return ack["seq"], got if type(got) is int else None
