"""The names a user may write, checked the same way on a rank and in the collector.

The rank side validates backend and policy names before training starts; what each name
means lives in ``ranklog.backends`` (its registry and policies), which checks that it
knows exactly these names.

>>> parse_policy_spec("tensorboard=mean, wandb=rank0")
{'tensorboard': 'mean', 'wandb': 'rank0'}
"""

from __future__ import annotations

from collections.abc import Mapping

from ranklog.errors import ConfigError

BACKEND_NAMES = ("async", "tensorboard", "wandb", "mlflow")
REDUCING_POLICIES = ("mean", "min", "max", "sum")
POLICY_NAMES = ("rank0", "first", "all", *REDUCING_POLICIES)
DEFAULT_POLICY_TIMEOUT = 10.0
#: The longest run id, incarnation, host or logger name an envelope may carry.
MAX_NAME_CHARS = 1024


def parse_logger_types(loggers: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"async, tensorboard"`` or a list -> validated list of backend names."""
    names = loggers.split(",") if isinstance(loggers, str) else list(loggers)
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in BACKEND_NAMES]
    if unknown:
        hints = [f"{near!r} for {name!r}" for name in unknown if (near := near_backend(name))]
        meant = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ConfigError(
            f"unknown logger type(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(BACKEND_NAMES)}{meant}"
        )
    return names


def near_backend(word: str) -> str | None:
    """The backend name ``word`` is one or two edits away from (a typo), if any.

    >>> near_backend("asynx"), near_backend("tensorbord"), near_backend("logs")
    ('async', 'tensorboard', None)
    """
    distance, name = min((_edits(word.lower(), name), name) for name in BACKEND_NAMES)
    return name if 0 < distance <= 2 else None


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions from ``a`` to ``b``."""
    row = list(range(len(b) + 1))
    for i, char in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (char != other))
    return row[-1]


def parse_policy_spec(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"tensorboard=mean,wandb=rank0"`` (or a mapping) -> validated ``{backend: policy}``."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        pairs: list[tuple[str, str]] = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            backend, sep, policy = item.partition("=")
            if not sep or not backend.strip() or not policy.strip():
                raise ConfigError(f"policy {item!r}: expected BACKEND=POLICY, e.g. wandb=rank0")
            pairs.append((backend.strip(), policy.strip()))
    else:
        pairs = list(spec.items())
    result: dict[str, str] = {}
    for backend, policy in pairs:
        if policy not in POLICY_NAMES:
            raise ConfigError(
                f"unknown rank policy {policy!r} for {backend}; expected one of "
                f"{', '.join(POLICY_NAMES)}"
            )
        result[backend] = policy
    return result


def format_policy_spec(policies: Mapping[str, str]) -> str:
    """The inverse of :func:`parse_policy_spec`, for a command line."""
    return ",".join(f"{backend}={policy}" for backend, policy in policies.items())


# InstructLab's per-backend keyword arguments of setup_metric_logger, each the name of a
# collector flag too (``--wandb-project``): which backend it configures, as which argument.
BACKEND_OPTIONS: dict[str, tuple[str, str]] = {
    "tensorboard_log_dir": ("tensorboard", "log_dir"),
    "wandb_project": ("wandb", "project"),
    "wandb_entity": ("wandb", "entity"),
    "wandb_run_name": ("wandb", "run_name"),
    "mlflow_tracking_uri": ("mlflow", "tracking_uri"),
    "mlflow_experiment_name": ("mlflow", "experiment_name"),
    "mlflow_run_name": ("mlflow", "run_name"),
}

RUN_NAME_PLACEHOLDERS = ("{time}", "{utc_time}", "{rank}", "{local_rank}")


def check_run_name(run_name: str | None) -> None:
    """Raise ConfigError for a ``{placeholder}`` the run name cannot fill (a typo such as
    ``{rnak}`` would otherwise name every run literally)."""
    if run_name is None:
        return
    rest = run_name
    for placeholder in RUN_NAME_PLACEHOLDERS:
        rest = rest.replace(placeholder, "")
    if "{" in rest or "}" in rest:
        raise ConfigError(
            f"run name {run_name!r}: unknown placeholder; use only "
            f"{', '.join(RUN_NAME_PLACEHOLDERS)}"
        )


def backend_options(settings: Mapping[str, str | None]) -> dict[str, dict[str, str]]:
    """``{"wandb_project": "p"}`` -> ``{"wandb": {"project": "p"}}`` (None values left out)."""
    options: dict[str, dict[str, str]] = {}
    for key, value in settings.items():
        if value is not None:
            backend, argument = BACKEND_OPTIONS[key]
            options.setdefault(backend, {})[argument] = str(value)
    return options
