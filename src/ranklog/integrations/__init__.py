"""One thin adapter per training framework, each on that framework's own extension point.

- :mod:`ranklog.integrations.transformers`: ``RanklogCallback``, a ``TrainerCallback``;
- :mod:`ranklog.integrations.lightning`: ``RanklogLogger``, a Lightning ``Logger``;
- :mod:`ranklog.integrations.accelerate`: ``RanklogTracker``, a ``GeneralTracker``.

Every rank logs: the frameworks' rank-zero gates are bypassed on purpose, and the
collector's rank policies decide what each backend keeps. Settings are
``setup_metric_logger``'s. Importing this package imports no framework; only the module of
one framework imports that framework.
"""
