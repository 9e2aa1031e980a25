"""The strategy interface: a Lightning callback with a few continual-learning hooks.

The runner calls, for experience i:
    strategy.before_experience(learner, stream, i)
    dataset = strategy.train_dataset(stream, i)       # what the learner trains on
    trainer.fit(...)                                  # Lightning calls the usual Callback hooks
    strategy.after_experience(learner, stream, i)
and the learner adds `strategy.extra_loss(learner, batch, logits)` to its task loss each step.

State that must survive a resume goes through `state_dict` / `load_state_dict` and must hold only
tensors, numbers, strings, lists and dicts (it is saved with torch.save and read with
weights_only=True).
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import Dataset

from nlcl.streams.base import TaskStream


class Strategy(L.Callback):
    name = "naive"

    def before_experience(self, learner, stream: TaskStream, index: int) -> None:
        pass

    def train_dataset(self, stream: TaskStream, index: int) -> Dataset:
        return stream.experiences[index].train

    def extra_loss(self, learner, batch, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_experience(self, learner, stream: TaskStream, index: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
