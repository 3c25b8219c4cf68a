"""Opt-in per-rank system metrics: sampled on the sender thread, delivered as records."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest

from ranklog.rank.system import SystemSampler, system_metrics_wanted
from tests.conftest import CollectorProcess, read_jsonl
from tests.ranks import finish, start_ranks


class TestSampler:
    """A sample: memory and CPU always; CUDA memory only where CUDA is initialised."""

    def test_sample_keys(self) -> None:
        sampler = SystemSampler(0.1, local_rank=0)
        metrics = sampler.sample(sampler.next_at)
        assert metrics["system/rss_mb"] > 1 and metrics["system/cpu_percent"] >= 0
        if "torch" not in sys.modules:
            assert "system/cuda_allocated_mb" not in metrics

    def test_cuda_memory_only_once_initialised(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The allocator's counters of the rank's device (torchrun: its local rank)."""
        asked: list[int] = []

        class Cuda:
            initialised = False

            def is_initialized(self) -> bool:
                return self.initialised

            def device_count(self) -> int:
                return 2

            def memory_allocated(self, device: int) -> int:
                asked.append(device)
                return 3 << 20

            def memory_reserved(self, device: int) -> int:
                return 8 << 20

        cuda = Cuda()
        monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
        sampler = SystemSampler(0.1, local_rank=1)
        assert "system/cuda_allocated_mb" not in sampler.sample(sampler.next_at)
        cuda.initialised = True
        metrics = sampler.sample(sampler.next_at)
        assert metrics["system/cuda_allocated_mb"] == 3.0
        assert metrics["system/cuda_reserved_mb"] == 8.0 and asked == [1]

    def test_opt_in(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("RANKLOG_SYSTEM_METRICS", raising=False)
        assert not system_metrics_wanted(None)
        monkeypatch.setenv("RANKLOG_SYSTEM_METRICS", "1")
        assert system_metrics_wanted(None) and not system_metrics_wanted(False)


class TestDelivered:
    """Each rank's samples land in its JSONL file, at its latest step."""

    def test_rss_at_the_sampling_interval(self, collector: Callable[..., CollectorProcess]) -> None:
        c = collector("--world-size", "2", "--exit-when-done")
        finish(start_ranks(c.endpoint, 2, 40, "--step-delay", "0.05", "--system-interval", "0.3"))
        assert c.wait(60) == 0, c.log()
        for rank in range(2):
            rows = read_jsonl(c.output_dir / f"training_params_and_metrics_global{rank}.jsonl")
            samples = [row for row in rows if "system/rss_mb" in row]
            assert 3 <= len(samples) <= 10, samples  # about 2 s / 0.3 s
            assert all(isinstance(row["step"], int) for row in samples), samples
            assert len([row for row in rows if "loss" in row]) == 40
