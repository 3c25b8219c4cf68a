"""A Lightning job with RanklogLogger under Lightning's own DDP launcher (it starts rank 1
by running this script again).

    python tests/lightning_job.py '<json>'

The JSON holds ``settings`` for RanklogLogger, ``work_dir``, ``crash_after`` (the step
after which training raises), ``misspelled`` (settings to try first) and ``witness`` (a
folder: a second logger notes there every step each rank logged, as an independent
account).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

from ranklog.integrations.lightning import RanklogLogger
from tests.witness import note, try_misspelled


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 0.1, hidden: int = 4, crash_after: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(hidden, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        crash_after = self.hparams["crash_after"]
        if crash_after is not None and self.global_step > crash_after:
            raise RuntimeError(f"training fails on purpose after step {crash_after}")
        loss = self.layer(batch).pow(2).mean()
        self.log("loss", loss)
        self.log("rank_seen", float(self.global_rank))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


class Witness(Logger):  # type: ignore[misc]
    """Notes what Lightning hands its loggers, on every rank."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    name, version = "witness", 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        note(self.folder, self.rank, step, metrics)

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()


def main() -> None:
    spec = json.loads(sys.argv[1])
    try_misspelled(RanklogLogger, spec)
    data = torch.utils.data.DataLoader(torch.randn(160, 4), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=20, log_every_n_steps=2,
        logger=[RanklogLogger(**spec["settings"]), Witness(spec["witness"])],
        default_root_dir=spec["work_dir"],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Tiny(crash_after=spec.get("crash_after")), data)


if __name__ == "__main__":
    main()
