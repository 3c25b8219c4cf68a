"""An Accelerate training loop with RanklogTracker, as a user writes it.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        tests/accelerate_job.py '<json>'

(``accelerate launch --cpu --num_processes 2`` starts one process in accelerate 1.16: its
multi-CPU path is mpirun. ``--multi_gpu`` is its torchrun launcher; on CPU, gloo.)

The JSON holds ``settings`` for RanklogTracker, ``crash_after`` (the step after which
training raises), ``misspelled`` (settings to try first) and ``witness`` (a folder: each
rank notes there every step it logged, as an independent account).
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator

from ranklog.integrations.accelerate import RanklogTracker
from tests.witness import note, try_misspelled


def main() -> None:
    spec = json.loads(sys.argv[1])
    crash_after = spec.get("crash_after")
    try_misspelled(RanklogTracker, spec)
    accelerator = Accelerator(log_with=RanklogTracker(**spec["settings"]))
    accelerator.init_trackers("tiny", config={"lr": 0.1, "hidden": 4})
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.DataLoader(torch.randn(160, 4), batch_size=4)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    for step, batch in enumerate(data):
        if step >= 20:
            break
        if crash_after is not None and step > crash_after:
            raise RuntimeError(f"training fails on purpose after step {crash_after}")
        loss = model(batch).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        values = {"loss": loss.item(), "rank_seen": accelerator.process_index}
        accelerator.log(values, step=step)
        note(spec["witness"], accelerator.process_index, step, values)
    accelerator.end_training()


if __name__ == "__main__":
    main()
