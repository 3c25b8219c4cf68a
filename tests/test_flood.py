"""A flood of made-up rank incarnations against a real collector: the table stays bounded,
a real rank still lands every record, and the log says it in a few lines."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq

from ranklog.collector.events import EVENTS_FILE
from ranklog.collector.peers import MAX_INCARNATIONS, Peer, RankTable
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import detect_identity
from ranklog.wire import decode
from tests.conftest import CollectorProcess, read_jsonl
from tests.ranks import finish, start_rank
from tests.test_delivery import wait_for

FLOOD = 150_000
PER_MESSAGE = 500  # heartbeats per message, as a rank batches its frames
RECORDS = 200


def made_up_heartbeats(count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``(incarnation, heartbeat frame)`` of ``count`` incarnations with random run ids,
    ranks and world sizes, packed by the rank's own encoder."""
    rng = random.Random(seed)
    for _ in range(count):
        identity = detect_identity(
            rank=rng.randrange(1 << 20),
            local_rank=0,
            world_size=rng.randrange(1, 1 << 21),
            run_id=f"made-up-{rng.getrandbits(48):x}",
        )
        frame = RecordEncoder(identity).control("heartbeat", base=1, dropped=0, converted=0)
        yield identity.incarnation, frame


def flood(endpoint: str, count: int, seed: int = 18) -> int:
    """Send heartbeats of ``count`` made-up incarnations through one DEALER; return once
    the last one is acknowledged (the collector has taken them all), or no ack came for 10
    seconds (it refuses them). Returns the acks.

    The last heartbeat goes again every second until its ack comes (as a rank's would): a
    collector drops an ack its peer's queue has no room for."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    acks = 0

    def take_acks(timeout_ms: int, last: str = "") -> bool:
        nonlocal acks
        got_last = False
        while sock.poll(timeout_ms, zmq.POLLIN):
            ack = decode(sock.recv())
            acks += 1
            got_last = got_last or ack["inc"] == last
            timeout_ms = 0
        return got_last

    try:
        batch: list[bytes] = []
        heartbeats = list(made_up_heartbeats(count, seed))
        for _, frame in heartbeats:
            batch.append(frame)
            if len(batch) == PER_MESSAGE:
                sock.send_multipart(batch)
                batch = []
                take_acks(0)
        batch = batch or [frame]
        heard = (acks, time.monotonic())
        while time.monotonic() - heard[1] < 10:
            sock.send_multipart(batch)
            if take_acks(1000, last=heartbeats[-1][0]):
                break
            heard = (acks, time.monotonic()) if acks > heard[0] else heard
            batch = [frame]
        return acks
    finally:
        sock.close()
        ctx.term()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]


class TestFlood:
    """150,000 made-up incarnations, then a real rank."""

    def test_a_real_rank_lands_everything_after_a_flood(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        c = collector("--silence-timeout", "5", output_dir=out)
        started = time.monotonic()
        acks = flood(c.endpoint, FLOOD)
        flood_s = time.monotonic() - started
        # The made-up incarnations go silent together: a few lines, not one per incarnation.
        wait_for(lambda: "silent for" in c.log(), 60)
        finish([start_rank(c.endpoint, 0, 1, RECORDS, "--run-id", "real")], timeout=120)
        jsonl = out / "training_params_and_metrics_global0.jsonl"

        def steps() -> list[object]:
            rows = read_jsonl(jsonl) if jsonl.exists() else []
            return [row["step"] for row in rows if "step" in row]

        with contextlib.suppress(AssertionError):  # acknowledged: the backends write it soon
            wait_for(lambda: len(steps()) >= RECORDS, 30)
        rss = peak_rss_mib(c.proc.pid)
        log = c.log().splitlines()
        about_the_flood = [line for line in log if "made-up" in line or "incarnation" in line
                           or "joined" in line or "silent" in line]  # fmt: skip
        print(f"flood {flood_s:.1f}s, {acks} acks; the real rank landed {len(steps())} of "
              f"{RECORDS}; peak RSS {rss:.0f} MiB; {len(log)} log lines, "
              f"{len(about_the_flood)} about the flood")  # fmt: skip
        assert steps() == list(range(RECORDS))
        assert rss < 300, f"the collector peaked at {rss:.0f} MiB"
        assert len(about_the_flood) < 100, "\n".join(log[:200])
        evicted = lambda: sum(  # noqa: E731 - summed once a second, so polled
            e["count"] for e in events(out) if e["event"] == "incarnations_evicted"
        )
        wait_for(lambda: evicted() >= FLOOD - MAX_INCARNATIONS, 10)
        assert len(events(out)) < 2_000  # the events file is bounded too


class TestEvictionOrder:
    """Which incarnation a full table lets go: the cheapest one to forget."""

    @staticmethod
    def table(*states: str) -> RankTable:
        """A full table of 3, oldest heard first: ``old`` (read back from an earlier run),
        ``fresh`` (live, no record yet), ``recorded`` (live, sent records)."""
        ranks = RankTable(capacity=3)
        for rank, what in enumerate(states):
            peer = Peer(rank=rank, world_size=8, host="h", pid=rank, recorded=what != "fresh")
            peer.live = what != "old"
            ranks.add(("job", rank, what), peer)
        return ranks

    def evict_one(self, ranks: RankTable) -> list[int]:
        """Add a new incarnation (rank 99); the ranks left."""
        ranks.add(("job", 99, "new"), Peer(rank=99, world_size=8, host="h", pid=99))
        assert ranks.evicted == 1
        return sorted(peer.rank for peer in ranks)

    def test_an_earlier_runs_incarnation_goes_first(self) -> None:
        assert self.evict_one(self.table("old", "fresh", "recorded")) == [1, 2, 99]

    def test_then_one_that_never_sent_a_record_even_if_heard_later(self) -> None:
        assert self.evict_one(self.table("recorded", "fresh", "recorded")) == [0, 2, 99]

    def test_then_the_one_heard_longest_ago(self) -> None:
        ranks = self.table("recorded", "recorded", "recorded")
        ranks.heard(("job", 0, "recorded"))
        assert self.evict_one(ranks) == [0, 2, 99]
