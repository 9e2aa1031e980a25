"""Progress for output that is not a terminal (a log file, a SLURM job, a pipe): plain lines.

tqdm redraws its bar with carriage returns, which in a log file becomes one huge line; this prints
a short line about ten times per epoch instead. The loss is read from the device only on those
batches, so it adds no per-step host synchronisation.
"""
from __future__ import annotations

import sys
import time

import lightning as L


class PlainProgress(L.Callback):
    def __init__(self, experience: int, name: str, lines_per_epoch: int = 10, stream=None):
        self.experience, self.name = experience, name
        self.lines_per_epoch = max(1, lines_per_epoch)
        self.out = stream or sys.stdout
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        total = trainer.num_training_batches
        every = max(1, int(total) // self.lines_per_epoch) if total and total != float("inf") else 50
        last = total and batch_idx + 1 == total
        if (batch_idx + 1) % every and not last:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
        print(f"[nlcl] experience {self.experience} ({self.name}) epoch {trainer.current_epoch + 1}/"
              f"{trainer.max_epochs}: batch {batch_idx + 1}/{total}{loss_text}, "
              f"{time.perf_counter() - self._t0:.1f}s", file=self.out, flush=True)
