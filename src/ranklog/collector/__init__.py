"""The collector: receive every rank's envelopes, journal them, acknowledge, and run the
backends' process that follows the journal.

- ``collector``: the entry points ``serve`` (``ranklog collect``) and ``replay`` (``ranklog
  replay``), and ``Collector``, the library object over them.
- ``settings``: what a collector is told, and every default of it.
- ``receive``: the receive step, frames in, what to journal and acknowledge out (no sockets).
- ``router``: the ROUTER socket and its CURVE authenticator.
- ``store``: the journal, what was accepted into it, and the backends' process.
- ``peers``: the rank table and per-incarnation de-duplication.
- ``liveness``: silent ranks and the exit rule; ``events``: the events file; ``stats``: the
  counters and the status line; ``joins``: ranks joining, said in one line per burst.
- ``launch``: launch mistakes (a rank claimed twice, world sizes that differ); ``hung``: a
  job no rank steps in (warnings to rank 0's terminal: ``ranklog.reporting``).
- ``spills``: ingesting what ranks spilled at exit; ``ownership``: which collector serves an
  output dir, and whether the last one stopped cleanly.
- ``cadence``: a rank's step cadence, O(1) per record; ``progress``: rates, stalls and
  straggler scores, once a second.
- ``status``: the job as ``ranklog top`` and ``/metrics`` see it; ``top``: ``ranklog top``;
  ``prometheus``: the ``/metrics`` endpoint.
- ``backend_process``: the handle on the backends' process; ``cli``: the command line,
  ``flags``: its flags.
"""
