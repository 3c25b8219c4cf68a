"""``--metrics-port``: a Prometheus text endpoint (``/metrics``) over the collector's view.

A custom collector (prometheus_client's way for exporters that proxy another system's
state): each scrape reads the snapshot the receive loop last published (at most a second
old), so receiving a record costs nothing extra, and nothing is shared but one dict swapped
in whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ranklog.errors import ConfigError

STATES = ("running", "stalled", "silent", "finished")


class Published(Protocol):
    """What publishes snapshots: :class:`ranklog.collector.status.Watch`."""

    latest: dict[str, Any]


class RanklogCollector(Collector):
    """The ranks' steps, states, scores and drops; throughput; backends' lag; and the latest
    value of the user metrics named in ``--export-metric``."""

    def __init__(self, source: Published) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snapshot = self.source.latest
        job = snapshot["run"] or ""
        yield CounterMetricFamily(
            "ranklog_records", "Records accepted (journaled) by the collector",
            value=snapshot["records_total"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ranklog_records_per_second", "Records accepted per second",
            value=snapshot["records_per_s"],
        )  # fmt: skip
        lag = GaugeMetricFamily(
            "ranklog_backend_lag_bytes",
            "Journal bytes durable but beyond the backend's last checkpoint",
            labels=["backend"],
        )
        for backend in snapshot["backends"]:
            lag.add_metric([backend["name"]], backend["lag_bytes"])
        yield lag
        yield from _rank_families(snapshot["ranks"], job)


def _rank_families(rows: list[dict[str, Any]], job: str) -> Iterator[Metric]:
    labels = ["rank", "run"]
    step = GaugeMetricFamily("ranklog_rank_step", "The rank's latest step", labels=labels)
    rate = GaugeMetricFamily("ranklog_rank_steps_per_second", "Step rate", labels=labels)
    state = GaugeMetricFamily(
        "ranklog_rank_state", "1 for the rank's state", labels=[*labels, "state"]
    )
    score = GaugeMetricFamily(
        "ranklog_rank_straggler_score",
        "Step rate relative to the best rank (relative) or to its own best (individual)",
        labels=[*labels, "kind"],
    )
    dropped = CounterMetricFamily(
        "ranklog_rank_dropped", "Records the rank dropped (outbox full)", labels=labels
    )
    resent = CounterMetricFamily("ranklog_rank_resent", "Records the rank resent", labels=labels)
    metric = GaugeMetricFamily(
        "ranklog_metric", "Latest value of an exported user metric", labels=["name", *labels]
    )
    for row in rows:
        rank = [str(row["rank"]), job]
        if row["step"] is not None:
            step.add_metric(rank, row["step"])
        if row["steps_per_s"] is not None:
            rate.add_metric(rank, row["steps_per_s"])
        for name in STATES:
            state.add_metric([*rank, name], float(row["state"] == name))
        for kind in ("relative", "individual"):
            if row[kind] is not None:
                score.add_metric([*rank, kind], row[kind])
        dropped.add_metric(rank, row["dropped"])
        resent.add_metric(rank, row["resent"])
        for name, value in row["metrics"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metric.add_metric([name, *rank], float(value))
    yield from (step, rate, state, score, dropped, resent, metric)


def serve_metrics(host: str, port: int, source: Published) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a thread; returns the HTTP server (call
    ``shutdown()`` and ``server_close()`` on it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RanklogCollector(source))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve /metrics on {host}:{port}: {exc.strerror}") from None
    return server
