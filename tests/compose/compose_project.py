"""Compose projects of docker/compose.yaml for the compose test, driven through the CLI.

Every docker and compose call has its own timeout, so a hung engine fails the test with the
step that hung instead of stalling CI. The containers only talk to each other on their
compose network; the test reads what the collector wrote to a host directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
SERVICES = ("collector", "node0", "node1")

BUILD_TIMEOUT = 1200  # a fresh machine: debootstrap, wheels, two image builds
STEP_TIMEOUT = 120  # any single docker / compose call

#: Seconds each stage took, shown in the terminal summary.
TIMINGS: dict[str, float] = {}
STAGE_DONE = re.compile(r"^build\.sh: -- (.+): done in (\d+)s$", re.MULTILINE)

#: ``RANKLOG_REQUIRE_COMPOSE=1`` (set by .ci/run) turns every skip of the compose test into a
#: failure: CI must run it.
REQUIRE_ENV = "RANKLOG_REQUIRE_COMPOSE"
#: docker/build.sh's exit status when this host cannot get a base image at all (no engine, or
#: neither debootstrap nor a registry); it says why on a "build.sh: UNAVAILABLE:" line.
BUILD_UNAVAILABLE = 69
UNAVAILABLE_LINE = re.compile(r"^build\.sh: UNAVAILABLE: (.+)$", re.MULTILINE)


def not_here(reason: str) -> NoReturn:
    """Skip the compose test with ``reason``; fail instead where RANKLOG_REQUIRE_COMPOSE=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(
            f"compose test cannot run ({REQUIRE_ENV}=1 requires it): {reason}", pytrace=False
        )
    pytest.skip(f"compose test skipped: {reason}")


def check_build(result: subprocess.CompletedProcess[str]) -> None:
    """docker/build.sh's outcome as the test's: 0 goes on; 69 skips with build.sh's reason
    (this host cannot build the images); anything else, a broken build, fails."""
    if result.returncode == 0:
        return
    if result.returncode == BUILD_UNAVAILABLE:
        reasons = UNAVAILABLE_LINE.findall(result.stderr) or ["no reason given"]
        not_here(f"docker/build.sh cannot build the images on this host: {reasons[-1]}")
    pytest.fail(f"docker/build.sh failed ({result.returncode}):\n{result.stderr[-6000:]}")


def run(
    command: list[str],
    *,
    timeout: float = STEP_TIMEOUT,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; fail the test with its output when it fails or hangs."""
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(command)}` did not finish within {timeout:.0f}s\n{exc.output}")
    if check and result.returncode != 0:
        pytest.fail(
            f"`{' '.join(command)}` exited with {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def engine_problem() -> str | None:
    """Why no Docker engine can run the test, or None when one answers."""
    if shutil.which("docker") is None:
        return "the docker command is not installed (run: bash docker/engine.sh)"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20s (run: bash docker/engine.sh)"
    if info.returncode != 0 or not info.stdout.strip():
        reason = (info.stderr.strip().splitlines() or ["no server version"])[-1]
        return f"no Docker engine answers `docker info` ({reason}); run: bash docker/engine.sh"
    return None


def compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) when present, else ``docker-compose`` (v1)."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for command in candidates:
        if shutil.which(command[0]) is None:
            continue
        try:
            probe = subprocess.run(
                [*command, "version"], capture_output=True, text=True, timeout=20
            )
        except subprocess.TimeoutExpired:
            continue
        if probe.returncode == 0:
            return command
    return None


@dataclass
class ComposeRun:
    """One compose project of docker/compose.yaml: its settings, its containers, its output."""

    compose: list[str]
    project: str
    output_dir: Path
    settings: dict[str, str]
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        # Compose v1 gives up on an engine call after 60s; a loaded machine can take longer.
        return {"COMPOSE_HTTP_TIMEOUT": "300", **os.environ, **self.settings}

    def __call__(self, *args: str, timeout: float = STEP_TIMEOUT, check: bool = True) -> str:
        command = [*self.compose, "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        return run(command, timeout=timeout, env=self.env, check=check).stdout

    def up(self) -> None:
        self("up", "-d", "--no-build", timeout=300)
        for service in SERVICES:
            self.ids[service] = self.container(service)

    def container(self, service: str) -> str:
        # Labels, not `compose ps`: v1 and v2 agree on them, and they list exited containers.
        project = f"label=com.docker.compose.project={self.project}"
        labels = ["--filter", project, "--filter", f"label=com.docker.compose.service={service}"]
        out = run(["docker", "ps", "-a", "-q", "--no-trunc", *labels]).stdout.split()
        assert len(out) == 1, f"expected one {service} container in {self.project}, got {out}"
        return out[0]

    def state(self, service: str) -> tuple[str, int]:
        template = "{{.State.Status}} {{.State.ExitCode}}"
        out = run(["docker", "inspect", "-f", template, self.ids[service]]).stdout.split()
        return out[0], int(out[1])

    def wait_exited(self, timeout: float) -> dict[str, int]:
        """Wait until every container exited; their exit codes."""
        deadline = time.monotonic() + timeout
        while True:
            states = {service: self.state(service) for service in SERVICES}
            if all(status == "exited" for status, _ in states.values()):
                return {service: code for service, (_, code) in states.items()}
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the compose run did not finish within {timeout:.0f}s: {states}\n"
                    + self.logs()
                )
            time.sleep(1)

    def logs(self, tail: int = 60) -> str:
        parts = []
        for service, container in self.ids.items():
            out = run(["docker", "logs", "--tail", str(tail), container], check=False)
            parts.append(f"--- {service} (last {tail} lines) ---\n{out.stdout}{out.stderr}")
        return "\n".join(parts)

    def save_logs(self) -> Path:
        path = self.output_dir.parent / f"{self.project}.log"
        path.write_text(self.logs(tail=100000))
        return path

    def down(self) -> None:
        # Not checked: a failing clean-up must not hide the test's own failure.
        self("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)
