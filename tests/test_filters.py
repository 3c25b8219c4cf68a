"""The seed's filters and run-name placeholders keep InstructLab's semantics."""

from __future__ import annotations

import logging
from datetime import datetime

import pytest

from ranklog import FormatDictFilter, IsMappingFilter, IsRank0Filter
from ranklog.run_name import substitute_placeholders


def _record(msg: object, **attrs: object) -> logging.LogRecord:
    record = logging.LogRecord("m", logging.INFO, "f", 1, msg, None, None)
    record.__dict__.update(attrs)
    return record


class TestIsMappingFilter:
    """Only dict messages pass."""

    def test_mapping_passes_string_does_not(self) -> None:
        f = IsMappingFilter()
        assert f.filter(_record({"loss": 1.0}))
        assert not f.filter(_record("text"))


class TestIsRank0Filter:
    """Rank from the record, then the explicit value, then the environment."""

    def test_record_rank_attribute_decides(self) -> None:
        f = IsRank0Filter()
        assert f.filter(_record({}, rank=0))
        assert not f.filter(_record({}, rank=1))

    def test_explicit_zero_counts_as_zero(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RANK", "3")
        assert IsRank0Filter(rank_val=0).filter(_record({}))
        assert not IsRank0Filter(rank_val=2).filter(_record({}))

    def test_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RANK", "1")
        assert not IsRank0Filter().filter(_record({}))
        monkeypatch.setenv("RANK", "0")
        assert IsRank0Filter().filter(_record({}))

    def test_local_rank(self, monkeypatch: pytest.MonkeyPatch) -> None:
        f = IsRank0Filter(local_rank=True)
        assert f.filter(_record({}, rank=5, local_rank=0))
        assert not f.filter(_record({}, rank=0, local_rank=1))
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.delenv("RANK", raising=False)
        assert f.filter(_record({}))  # nothing known: rank 0


class TestIsRank0FilterSourceOrder:
    """The seed's documented order: explicit rank_val, the record's attribute, the message
    dict, the environment, torch.distributed; each source only when the earlier ones have
    no rank."""

    def test_explicit_rank_val_beats_the_record(self) -> None:
        assert IsRank0Filter(rank_val=0).filter(_record({}, rank=1))
        assert not IsRank0Filter(rank_val=1).filter(_record({}, rank=0))

    def test_record_attribute_beats_the_message_dict(self) -> None:
        assert IsRank0Filter().filter(_record({"rank": 1}, rank=0))
        assert not IsRank0Filter().filter(_record({"rank": 0}, rank=1))

    def test_message_dict_beats_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RANK", "0")
        assert not IsRank0Filter().filter(_record({"rank": 1, "loss": 0.5}))
        monkeypatch.setenv("RANK", "2")
        assert IsRank0Filter().filter(_record({"rank": 0, "loss": 0.5}))

    def test_message_dict_local_rank(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert not IsRank0Filter(local_rank=True).filter(_record({"local_rank": 3}))

    def test_environment_then_nothing_means_rank0(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # torch.distributed is not initialised in this process (test_handler's
        # test_torch_distributed covers that source in a process of its own).
        monkeypatch.setenv("RANK", "1")
        assert not IsRank0Filter().filter(_record({"loss": 0.5}))
        monkeypatch.delenv("RANK")
        assert IsRank0Filter().filter(_record({"loss": 0.5}))


class TestFormatDictFilter:
    """Dicts become `k=v` strings; other messages pass untouched."""

    def test_formats_nested_dict(self) -> None:
        record = _record({"loss": 0.5, "lr": 1e-5, "steps": 1000, "n": {"name": "a"}})
        assert FormatDictFilter().filter(record)
        assert record.msg == "loss=0.500, lr=1.00e-05, steps=1000, n/name='a'"

    def test_string_untouched(self) -> None:
        record = _record("plain")
        assert FormatDictFilter().filter(record) and record.msg == "plain"


class TestRunNamePlaceholders:
    """{time}, {utc_time}, {rank}, {local_rank}."""

    def test_all_placeholders(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RANK", "4")
        monkeypatch.setenv("LOCAL_RANK", "1")
        now = datetime(2026, 1, 2, 3, 4, 5)
        name = substitute_placeholders("{time}|{utc_time}|r{rank}|l{local_rank}", now=now)
        time_part, utc_part, rank_part, local_part = name.split("|")
        assert time_part == "2026-01-02T03:04:05"
        assert utc_part.endswith("+00:00")
        assert (rank_part, local_part) == ("r4", "l1")

    def test_explicit_rank_wins_and_default_template(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RANK", "4")
        assert substitute_placeholders(None, "metrics_global{rank}", rank=0) == "metrics_global0"
        name = substitute_placeholders(None)
        assert name.endswith("_rank4")
