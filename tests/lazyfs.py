"""A LazyFS mount for power-cut tests (``../shared/tools/lazyfs/``: FUSE with its own page
cache that drops every write not yet fsynced when told ``lazyfs::clear-cache``).

The binary is built by ``build.sh`` in ``RANKLOG_LAZYFS_DIR`` (default
``../shared/tools/lazyfs``, beside the repository) into ``RANKLOG_LAZYFS_BUILD`` (default
``/var/tmp/ranklog-lazyfs``); ``make test-tools`` does that as root on Debian. Where it is not
built or cannot mount (no root, no /dev/fuse), :func:`lazyfs_binary` and :meth:`LazyFS.mount`
skip with the reason; ``RANKLOG_REQUIRE_LAZYFS=1`` (as .ci/run sets) fails instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.ranks import REPO

SOURCES = Path(os.environ.get("RANKLOG_LAZYFS_DIR", REPO.parent / "shared" / "tools" / "lazyfs"))
BUILD_SCRIPT = SOURCES / "build.sh"
DEFAULT_BUILD_DIR = "/var/tmp/ranklog-lazyfs"
CONFIG = """\
[faults]
fifo_path="{fifo}"
fifo_path_completed="{completed}"
[cache]
apply_eviction=false
[cache.simple]
custom_size="1gb"
blocks_per_page=1
[filesystem]
log_all_operations=false
logfile=""
"""


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail where CI requires LazyFS."""
    if os.environ.get("RANKLOG_REQUIRE_LAZYFS") == "1":
        pytest.fail(f"RANKLOG_REQUIRE_LAZYFS=1: {reason}")
    pytest.skip(reason)


def lazyfs_binary() -> Path:
    """The LazyFS binary that ``build.sh`` built (``make test-tools`` runs it)."""
    if not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None:
        unavailable("no FUSE here (/dev/fuse or fusermount3 is missing)")
    if os.geteuid() != 0:
        unavailable("mounting LazyFS with allow_other needs root")
    build_dir = Path(os.environ.get("RANKLOG_LAZYFS_BUILD", DEFAULT_BUILD_DIR))
    binary = build_dir / "lazyfs" / "build" / "lazyfs"
    if not os.access(binary, os.X_OK):
        unavailable(f"LazyFS is not built ({binary}): run `make test-tools` as root on Debian, "
                    f"or {BUILD_SCRIPT} {build_dir}")  # fmt: skip
    return binary


class LazyFS:
    """LazyFS mounted at ``mount_point`` over ``root``; :meth:`power_cut` drops every
    write not fsynced and mounts again, so later processes see what a reboot would."""

    def __init__(self, binary: Path, work: Path) -> None:
        self.binary = binary
        self.root = work / "lazyfs-root"
        self.mount_point = work / "mnt"
        self.fifo = work / "faults.fifo"
        self.config = work / "lazyfs.toml"
        self.log_path = work / "lazyfs.log"
        self._process: subprocess.Popen[bytes] | None = None
        for folder in (self.root, self.mount_point):
            folder.mkdir(parents=True, exist_ok=True)
        completed = work / "faults-completed.fifo"
        os.mkfifo(self.fifo)
        os.mkfifo(completed)
        # Held open for reading so that LazyFS's opening it for writing never blocks.
        self._completed = os.open(completed, os.O_RDONLY | os.O_NONBLOCK)
        self.config.write_text(CONFIG.format(fifo=self.fifo, completed=completed))

    def mount(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - LazyFS writes it for its whole life
        self._process = subprocess.Popen(
            [str(self.binary), str(self.mount_point), "--config-path", self.config.name,
             "-o", "allow_other", "-o", "modules=subdir", "-o", f"subdir={self.root}", "-f"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.config.parent,
        )  # fmt: skip
        # The config by a relative name: LazyFS ignores a --config-path that contains "-o"
        # (any case), as /tmp/pytest-of-root/... does.
        log.close()
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mount_point):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                unavailable(f"LazyFS did not mount: {self.log_path.read_text()[-500:]}")
            time.sleep(0.02)

    def power_cut(self, timeout: float = 20.0) -> None:
        """Drop every write not yet fsynced, then unmount and mount again. Every process
        writing under the mount must be dead already (a power cut stops them too)."""
        fifo = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fifo, b"lazyfs::clear-cache\n")
        finally:
            os.close(fifo)
        said = b""
        deadline = time.monotonic() + timeout
        while b"finished::clear-cache" not in said:
            assert time.monotonic() < deadline, "LazyFS never finished clearing its cache"
            with contextlib.suppress(BlockingIOError):
                said += os.read(self._completed, 4096)
            time.sleep(0.01)
        self.unmount()
        self.mount()

    def unmount(self, timeout: float = 20.0) -> None:
        if self._process is None:
            return
        if self._process.poll() is not None:
            # LazyFS died under its mount: the mount answers "Transport endpoint is not
            # connected" (so ismount says False) until it is detached.
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount_point)],
                           check=False, capture_output=True)  # fmt: skip
        elif os.path.ismount(self.mount_point):
            subprocess.run(["fusermount3", "-u", str(self.mount_point)], check=False)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout)
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount_point)], check=False)
        self._process = None

    def close(self) -> None:
        """Unmount; raises if LazyFS itself had crashed, so that a failure it caused is
        named as the test tool's."""
        died = self._process.poll() if self._process is not None else None
        self.unmount()
        os.close(self._completed)
        assert died is None, (
            f"LazyFS itself died (exit status {died}) under the test: a failure above is the "
            f"test tool's, not ranklog's; see {self.log_path} and dmesg"
        )
