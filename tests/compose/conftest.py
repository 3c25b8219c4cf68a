"""Docker fixtures for the compose test: an engine check, the images, and compose projects.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


def _engine_problem() -> str | None:
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


def _compose_command() -> list[str] | None:
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


@pytest.fixture(scope="session")
def compose() -> list[str]:
    """The compose command; skips the test when no engine or compose is there."""
    problem = _engine_problem()
    if problem:
        pytest.skip(f"compose test skipped: {problem}")
    command = _compose_command()
    if command is None:
        pytest.skip(
            "compose test skipped: neither `docker compose` nor `docker-compose` works "
            "(run: bash docker/engine.sh)"
        )
    return command


@pytest.fixture(scope="session")
def images(compose: list[str]) -> None:
    """Build the collector and rank images from this checkout (docker/build.sh).

    RANKLOG_COMPOSE_REUSE_IMAGES=1 uses ranklog/collector and ranklog/rank as they are
    (for iterating on the test itself).
    """
    if os.environ.get("RANKLOG_COMPOSE_REUSE_IMAGES") == "1":
        return
    started = time.monotonic()
    result = run(["bash", str(DOCKER_DIR / "build.sh")], timeout=BUILD_TIMEOUT, check=False)
    if result.returncode != 0:
        pytest.fail(f"docker/build.sh failed ({result.returncode}):\n{result.stderr[-6000:]}")
    for stage, seconds in STAGE_DONE.findall(result.stderr):
        TIMINGS[stage] = float(seconds)
    TIMINGS["build in all"] = time.monotonic() - started


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
        return {**os.environ, **self.settings}

    def __call__(self, *args: str, timeout: float = STEP_TIMEOUT) -> str:
        command = [*self.compose, "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        return run(command, timeout=timeout, env=self.env).stdout

    def up(self) -> None:
        self("up", "-d", "--no-build")
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
        self("down", "--volumes", "--remove-orphans", "--timeout", "5")


@pytest.fixture
def compose_run(compose: list[str], images: None, tmp_path: Path) -> Iterator[ComposeRun]:
    """A compose project writing to a fresh host directory; taken down afterwards."""
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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.write_line(
            "compose test timings: "
            + ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in TIMINGS.items())
        )
