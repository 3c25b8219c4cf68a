"""``ZMQSocketHandler``: the per-rank logging handler, a thin adapter over a sender.

The caller's thread only packs each LogRecord as an envelope (``RecordEncoder``) and hands
the bytes to a :class:`~ranklog.rank.sender.Sender`, which buffers them and delivers them
on a thread of its own.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref

from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import RankIdentity, derived_endpoint, detect_identity, new_incarnation
from ranklog.rank.outbox import Outbox
from ranklog.rank.sender import Sender, SenderConfig, SenderSettings, curve_keys

_live_handlers: weakref.WeakSet[ZMQSocketHandler] = weakref.WeakSet()


def _reset_handlers_in_child() -> None:
    for handler in list(_live_handlers):
        handler._after_fork()


os.register_at_fork(after_in_child=_reset_handlers_in_child)


class ZMQSocketHandler(logging.Handler):
    """Send each record to a ranklog collector over ZeroMQ; never block, never raise.

    >>> handler = ZMQSocketHandler("tcp://127.0.0.1:5555")          # doctest: +SKIP
    >>> logging.getLogger("instructlab.training.metrics").addHandler(handler)  # doctest: +SKIP

    ``endpoint`` defaults to ``RANKLOG_ENDPOINT``, else the address every rank of the job
    derives alike (see :func:`ranklog.rank.identity.derived_endpoint`). Rank fields default to
    torchrun's environment, then ``torch.distributed``, then 0/1. At most ``max_records``
    records / ``max_bytes`` bytes wait for acknowledgement; beyond that the oldest are
    dropped and counted.

    ``close()`` (run by ``logging.shutdown()`` at exit) first spills everything not yet
    acknowledged to a file, then waits as long as acknowledgements make progress: it gives
    up after ``close_timeout`` seconds without any, or ``close_limit`` seconds in all. It
    always says goodbye; what was delivered after all leaves the spill file, what was not
    stays in it for the next collector on the output dir (``spill_dir``, normally
    ``<output_dir>/.ranklog/spill``, when reachable; else ``~/.local/state/ranklog/spill``),
    and a warning says where. A warning also names the endpoint (and ``collector_log``)
    while records wait and no collector answers. ``system_metrics`` (default
    ``RANKLOG_SYSTEM_METRICS``) logs this process's memory, CPU and CUDA memory every
    ``system_interval`` seconds (default ``RANKLOG_SYSTEM_INTERVAL``, else 10) as records
    of the logger of the newest record (so they reach the same backends). See
    :class:`~ranklog.rank.sender.Sender`.

    A SIGTERM, SIGHUP or SIGQUIT (Slurm, Kubernetes, torchrun's tear-down) first spills
    what is not acknowledged (fsynced), says goodbye within a second, and names the spill
    file in one line on stderr; then the program's own handler runs if it installed one
    before, else the default action (the process ends with the same status). The handler is
    installed on the main thread only; ``handle_signals=False`` (default
    ``RANKLOG_HANDLE_SIGNALS``, on unless ``0``) leaves signals alone.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        level: int | str = logging.NOTSET,
        rank: int | None = None,
        local_rank: int | None = None,
        world_size: int | None = None,
        run_id: str | None = None,
        max_records: int = 100_000,
        max_bytes: int = 256 << 20,
        close_timeout: float = 5.0,
        close_limit: float = 300.0,
        settings: SenderSettings | None = None,
        curve_server_key: str | bytes | None = None,
        curve_key_file: str | os.PathLike[str] | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        collector_log: str | os.PathLike[str] | None = None,
        system_metrics: bool | None = None,
        system_interval: float | None = None,
        handle_signals: bool | None = None,
    ) -> None:
        super().__init__(level)
        identity = detect_identity(
            rank=rank, local_rank=local_rank, world_size=world_size, run_id=run_id
        )
        self._encoder = RecordEncoder(identity)
        config = SenderConfig(
            endpoint or derived_endpoint(identity),
            max_records=max_records,
            max_bytes=max_bytes,
            close_timeout=close_timeout,
            close_limit=close_limit,
            settings=settings or SenderSettings(),
            curve=curve_keys(curve_server_key, curve_key_file),
            spill_dir=spill_dir,
            collector_log=None if collector_log is None else os.fspath(collector_log),
            system_metrics=system_metrics,
            system_interval=system_interval,
            handle_signals=handle_signals,
        )
        self._sender = Sender(identity, config, converted=self._converted, record_lock=self.lock)
        self.records = 0  # emitted by this process
        # The logger setup_metric_logger attached this handler to: a rank 0 that closes
        # without a record then says so (a script logging to another logger records nothing).
        self.serves_logger: str | None = None
        _live_handlers.add(self)

    def _converted(self) -> int:
        return self._encoder.converted

    def _after_fork(self) -> None:
        # The child is a new incarnation with its own seq space, encoder and sender.
        identity = RankIdentity(
            **{**vars(self.identity), "pid": os.getpid(), "incarnation": new_incarnation()}
        )
        self._encoder = RecordEncoder(identity)
        self.createLock()
        self._sender = self._sender.for_child(identity, record_lock=self.lock)
        # The job's metrics are the parent's to log: a helper process that logs none (and
        # exits normally) has nothing to say about them.
        self.serves_logger = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sender = self._sender
            if not sender.running:
                if sender.closed:
                    return
                sender.start()
            seq = sender.next_seq()
            sender.put(seq, self._encoder.record(seq, record))
            self.records += 1
            if sender.link.asleep:
                sender.wake()
        except Exception:
            self.handleError(record)

    def start(self) -> None:
        """Connect and say hello now rather than at the first record."""
        self._sender.start()

    def flush(self) -> None:
        """Spill what is not acknowledged yet, and wait while acknowledgements make
        progress until everything emitted is (the spill file goes then)."""
        self._sender.flush()

    def close(self) -> None:
        """Spill, deliver while acknowledgements progress, say goodbye, stop the sender,
        and warn about anything not delivered (and where it was spilled)."""
        first = not self._sender.closed
        self._sender.close()
        if first and self.records == 0 and self.serves_logger and self.identity.rank == 0:
            warnings.warn(_nothing_logged(self.serves_logger), RuntimeWarning, stacklevel=2)
        super().close()

    @property
    def stats(self) -> dict[str, int]:
        """Counters a user can check: held (not yet acknowledged), dropped, converted."""
        return self._sender.stats

    # The sender's, for code written against the handler.
    @property
    def identity(self) -> RankIdentity:
        return self._sender.identity

    @property
    def endpoint(self) -> str:
        return self._sender.endpoint

    @property
    def outbox(self) -> Outbox:
        return self._sender.outbox

    @property
    def close_timeout(self) -> float:
        return self._sender.close_timeout


def _nothing_logged(logger_name: str) -> str:
    return (
        f"ranklog: rank 0 logged no metrics: no dict record reached the logger "
        f"{logger_name!r}, the one setup_metric_logger attached ranklog to. Log metric dicts "
        f"there, e.g. logging.getLogger({logger_name!r}).info({{'loss': loss}}, "
        f"extra={{'step': step}})"
    )
