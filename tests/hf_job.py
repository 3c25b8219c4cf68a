"""A HuggingFace Trainer job with RanklogCallback, as a user writes it (tiny GPT-2 built from
a config, data made here, nothing downloaded).

    torchrun --standalone --nproc-per-node 2 tests/hf_job.py '<json>'

The JSON holds ``settings`` for RanklogCallback, ``work_dir``, ``step_delay`` (seconds each
step sleeps), ``crash_after`` (the step after whose log training raises), ``misspelled``
(settings to try first) and ``witness`` (a folder: each rank notes there every step the
Trainer logged, as a second, independent account).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ranklog.integrations.transformers import RanklogCallback
from tests.witness import note, try_misspelled


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, rows: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (rows, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Pace(TrainerCallback):  # type: ignore[misc]
    """Slows the steps down (so a watcher sees them), notes what the Trainer logged, and
    raises right after the log of step ``crash_after`` (RanklogCallback, listed first, has
    just sent it)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.delay, self.crash_after = spec.get("step_delay", 0), spec.get("crash_after")
        self.witness = spec["witness"]

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        time.sleep(self.delay)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        note(self.witness, args.process_index, state.global_step, logs)
        if self.crash_after is not None and state.global_step >= self.crash_after:
            raise RuntimeError(f"training fails on purpose after step {self.crash_after}")


def main() -> None:
    spec = json.loads(sys.argv[1])
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    args = TrainingArguments(
        output_dir=spec["work_dir"], max_steps=20, logging_steps=2, eval_strategy="steps",
        eval_steps=10, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
        ddp_backend="gloo", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    try_misspelled(RanklogCallback, spec)
    trainer = Trainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens(80),
        eval_dataset=Tokens(8),
        callbacks=[RanklogCallback(**spec["settings"]),
                   Pace(spec)],
    )  # fmt: skip
    trainer.train()


if __name__ == "__main__":
    main()
