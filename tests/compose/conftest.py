"""Fixtures for the compose test: an engine (or a skip), the images, a compose project."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compose.compose_project import (
    BUILD_TIMEOUT,
    DOCKER_DIR,
    STAGE_DONE,
    TIMINGS,
    ComposeRun,
    check_build,
    compose_command,
    engine_problem,
    not_here,
    run,
)


@pytest.fixture(scope="session")
def compose() -> list[str]:
    """The compose command; skips the test when no engine or compose is there (fails
    instead under RANKLOG_REQUIRE_COMPOSE=1)."""
    problem = engine_problem()
    if problem:
        not_here(problem)
    command = compose_command()
    if command is None:
        not_here("neither `docker compose` nor `docker-compose` works (run: bash docker/engine.sh)")
    return command


@pytest.fixture(scope="session")
def images(compose: list[str]) -> None:
    """Build the collector and rank images from this checkout (docker/build.sh).

    A host that cannot get a base image (no debootstrap, no registry: build.sh exits 69)
    skips the test with build.sh's reason; any other build failure fails it.
    RANKLOG_COMPOSE_REUSE_IMAGES=1 uses ranklog/collector and ranklog/rank as they are
    (for iterating on the test itself).
    """
    if os.environ.get("RANKLOG_COMPOSE_REUSE_IMAGES") == "1":
        return
    started = time.monotonic()
    result = run(["bash", str(DOCKER_DIR / "build.sh")], timeout=BUILD_TIMEOUT, check=False)
    check_build(result)
    for stage, seconds in STAGE_DONE.findall(result.stderr):
        TIMINGS[stage] = float(seconds)
    TIMINGS["build in all"] = time.monotonic() - started


@pytest.fixture
def compose_run(
    compose: list[str], images: None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ComposeRun]:
    """A compose project writing to a fresh host directory; taken down afterwards. The
    timings so far go into the test's report (the summary line: tests/conftest.py)."""
    output_dir = tmp_path / "output"
    output_dir.mkdir()
    project = f"ranklogtest{os.getpid()}{tmp_path.name.replace('_', '').replace('-', '')}"
    settings = {
        "RANKLOG_OUTPUT_DIR": str(output_dir),
        # Containers write as this user, so pytest can read and remove what they wrote.
        "RANKLOG_UID": str(os.getuid()),
        "RANKLOG_GID": str(os.getgid()),
        "RANKLOG_RUN_NAME": project,
    }
    # Only for iterating with a partial backend set; the test's default is the full config.
    for name in ("RANKLOG_COLLECTOR_CONFIG", "RANKLOG_LOGGER_TYPE"):
        if name in os.environ:
            settings[name] = os.environ[name]
    runner = ComposeRun(compose, project.lower(), output_dir, settings)
    try:
        yield runner
    finally:
        if runner.ids:
            runner.save_logs()
        runner.down()
        request.node.user_properties.append(("compose timings", dict(TIMINGS)))
