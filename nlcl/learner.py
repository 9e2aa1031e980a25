"""The LightningModule that hosts any classifier and owns the optimizer hooks.

- Class-incremental training masks the logits to the classes seen so far (`seen_mask`).
- Strategies add their terms through `Strategy.extra_loss`.
- The multi-frequency optimizer keeps each slow level's pending period in its own state, so `.grad`
  is zeroed every step as usual and Lightning's gradient clipping clips each step's fresh gradient.
- Lightning restarts `global_step` with every Trainer; `total_steps` is ours and never restarts,
  and every metric is logged against it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e9  # stand-in for -inf that keeps softmax finite in every dtype we use


class Learner(L.LightningModule):
    def __init__(self, model: nn.Module, num_classes: int,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 strategies: Sequence = (), log_every: int = 25, mask_unseen: bool = True,
                 objective: str = "classify"):
        super().__init__()
        self.model = model
        self.strategies = list(strategies)
        self.log_every = log_every
        self.mask_unseen = mask_unseen
        self.objective = objective
        self.register_buffer("seen_mask", torch.zeros(num_classes, dtype=torch.bool))
        self.optimizer = make_optimizer(model)  # built once: its state lives across experiences
        self.total_steps = 0
        self.experience = -1
        self._loss_sum = torch.zeros(())
        self._loss_count = 0

    # ---- experience bookkeeping (called by the runner) ----
    def start_experience(self, index: int, seen_classes: Sequence[int]) -> None:
        self.experience = index
        self.seen_mask.zero_()
        self.seen_mask[list(seen_classes)] = True

    # ---- forward and loss ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def masked(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.seen_mask if mask is None else mask
        if not self.mask_unseen and mask is self.seen_mask:
            return logits
        return logits.masked_fill(~mask, NEG)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.objective == "lm":  # next-token targets aligned with inputs, -100 where no loss
            return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), ignore_index=-100)
        return F.cross_entropy(self.masked(logits), y)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.task_loss(logits, y)
        for strategy in self.strategies:
            extra = strategy.extra_loss(self, batch, logits)
            if extra is not None:
                loss = loss + extra
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
        self._loss_count += 1
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.total_steps += 1
        if self.total_steps % self.log_every == 0:
            self.log_metrics({"train/loss": self._loss_sum / max(self._loss_count, 1),
                              "train/experience": self.experience})
            self._loss_sum, self._loss_count = torch.zeros(()), 0
            stats = getattr(self.optimizer, "level_stats", None)
            if stats is not None:
                self.log_metrics(flatten_level_stats(stats()))

    def log_metrics(self, metrics: dict) -> None:
        """Log against our monotone step counter (host sync happens here, outside forward/backward)."""
        if self._trainer is None:
            return
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.total_steps)

    # ---- optimizer hooks ----
    def configure_optimizers(self):
        return self.optimizer

    # ---- state that a resume needs beyond Lightning's own ----
    def run_state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "total_steps": self.total_steps, "experience": self.experience,
                "strategies": {type(s).__name__: s.state_dict() for s in self.strategies}}

    def load_run_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.total_steps = int(state["total_steps"])
        self.experience = int(state["experience"])
        for s in self.strategies:
            s.load_state_dict(state["strategies"].get(type(s).__name__, {}))


def flatten_level_stats(stats: dict) -> dict:
    """{level: {stat: value}} -> {"levels/<level>/<stat>": value}."""
    out = {}
    for level, values in stats.items():
        for key, value in values.items():
            out[f"levels/{level}/{key}"] = value
    return out
