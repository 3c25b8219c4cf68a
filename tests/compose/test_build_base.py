"""docker/build.sh on hosts that cannot make its default base image (no debootstrap).

It falls back to ``python:3.11-slim`` from a registry; with no registry either it exits 69
with a reason, which the compose test turns into a skip (a failure under
RANKLOG_REQUIRE_COMPOSE=1), while any other build failure stays a failure. These tests run
the real build.sh with ``debootstrap`` hidden from PATH and a base image name that is not
present locally. The first ones put a stub ``docker`` on PATH, so they need no engine; the
last one uses the real engine and skips where none answers. None of them builds an image.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.compose.compose_project import (
    BUILD_UNAVAILABLE,
    DOCKER_DIR,
    REQUIRE_ENV,
    check_build,
    engine_problem,
)

#: A name build.sh must make itself (ranklog/*) and that no local image store holds.
ABSENT_BASE = f"ranklog/python:absent-{os.getpid()}"
#: What docker says for `docker pull` where no registry answers.
NO_REGISTRY = (
    'Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: '
    "lookup registry-1.docker.io: no such host"
)

# A docker CLI whose engine answers and holds no image; `docker pull` prints $STUB_PULL_ERROR
# and fails, or succeeds when that is empty. Every call is appended to $STUB_DOCKER_LOG.
STUB_DOCKER = """#!/bin/bash
echo "$*" >>"$STUB_DOCKER_LOG"
case "$1" in
    info) exit 0 ;;
    image) exit 1 ;;
    pull) [[ -z "$STUB_PULL_ERROR" ]] && exit 0; echo "$STUB_PULL_ERROR" >&2; exit 1 ;;
    *) echo "stub docker: unexpected call: $*" >&2; exit 2 ;;
esac
"""


def path_without(bin_dir: Path, *hidden: str) -> str:
    """A PATH of one directory holding links to every command on this PATH but ``hidden``."""
    bin_dir.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not Path(directory).is_dir():
            continue
        for entry in Path(directory).iterdir():
            link = bin_dir / entry.name
            if entry.name in hidden or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry, os.X_OK):
                link.symlink_to(entry)
    assert all(shutil.which(name, path=str(bin_dir)) is None for name in hidden)
    return str(bin_dir)


def build_sh(path: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run docker/build.sh with ``path`` and the absent base image; the caller's RANKLOG_*
    settings left out."""
    settings = {k: v for k, v in os.environ.items() if not k.startswith("RANKLOG_")}
    settings.update(PATH=path, RANKLOG_BASE_IMAGE=ABSENT_BASE, **env)
    return subprocess.run(
        ["bash", str(DOCKER_DIR / "build.sh"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=settings,
    )


@pytest.fixture
def stub_path(tmp_path: Path) -> str:
    """PATH without debootstrap and with the stub docker."""
    path = path_without(tmp_path / "bin", "debootstrap", "docker")
    stub = Path(path) / "docker"
    stub.write_text(STUB_DOCKER)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def stub_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "docker-calls.log"
    return log.read_text().splitlines() if log.exists() else []


class TestNoDebootstrap:
    def test_no_registry_either_skips_the_compose_test_with_the_reason(
        self, stub_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        result = build_sh(
            stub_path,
            STUB_DOCKER_LOG=str(tmp_path / "docker-calls.log"),
            STUB_PULL_ERROR=NO_REGISTRY,
        )
        assert result.returncode == BUILD_UNAVAILABLE, result.stderr
        assert "pull python:3.11-slim" in stub_calls(tmp_path)
        assert not any(call.startswith("build") for call in stub_calls(tmp_path))

        monkeypatch.delenv(REQUIRE_ENV, raising=False)
        with pytest.raises(pytest.skip.Exception) as skipped:
            check_build(result)
        reason = str(skipped.value)
        assert reason.startswith("compose test skipped: docker/build.sh cannot build"), reason
        assert "debootstrap is not installed" in reason
        assert f"docker pull python:3.11-slim failed ({NO_REGISTRY})" in reason

        monkeypatch.setenv(REQUIRE_ENV, "1")  # CI: the same host is a failure
        with pytest.raises(pytest.fail.Exception, match="RANKLOG_REQUIRE_COMPOSE=1 requires"):
            check_build(result)

    def test_a_registry_gives_python_slim_as_the_base(self, stub_path: str, tmp_path: Path) -> None:
        result = build_sh(
            stub_path, "--base-only", STUB_DOCKER_LOG=str(tmp_path / "docker-calls.log")
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "python:3.11-slim"
        assert "pull python:3.11-slim" in stub_calls(tmp_path)
        assert "debootstrap is not installed" in result.stderr

    def test_other_build_failures_fail(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(REQUIRE_ENV, raising=False)
        broken = subprocess.CompletedProcess(
            ["bash", "docker/build.sh"],
            1,
            "",
            "build.sh: ERROR: docker build of ranklog/rank:latest failed (log: ...)\n",
        )
        with pytest.raises(pytest.fail.Exception, match=r"docker/build.sh failed \(1\)"):
            check_build(broken)


def test_real_engine_without_debootstrap_or_registry_skips(tmp_path: Path) -> None:
    """The same with the real engine; the fallback is an unresolvable registry (.invalid), so
    no registry answers even on a host that has one."""
    problem = engine_problem()
    if problem:
        pytest.skip(f"needs a Docker engine: {problem}")
    fallback = "registry.invalid/ranklog-test/python:3.11-slim"
    result = build_sh(
        path_without(tmp_path / "bin", "debootstrap"), RANKLOG_FALLBACK_BASE_IMAGE=fallback
    )
    assert result.returncode == BUILD_UNAVAILABLE, result.stderr
    assert "debootstrap is not installed" in result.stderr
    assert f"docker pull {fallback} failed" in result.stderr
