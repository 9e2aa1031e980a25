"""Task streams: an ordered list of experiences, each with train/test data and the classes it adds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset


class StreamError(ValueError):
    """A stream that cannot be trained on; the message names the experience, field or file."""


class TensorPairDataset(Dataset):
    """(x, y) pairs held as two tensors; indexing returns a pair, slicing stays cheap."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise StreamError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def subset(self, index: torch.Tensor) -> "TensorPairDataset":
        return TensorPairDataset(self.x[index], self.y[index])


@dataclass
class Experience:
    index: int
    name: str
    classes: list[int]
    train: TensorPairDataset
    test: TensorPairDataset
    task_label: int = 0
    val: TensorPairDataset | None = None  # held-out training samples, when asked for (hold_out_validation)


@dataclass
class TaskStream:
    """An ordered list of experiences over a shared label space of `num_classes` classes.

    `input_kind` is "tokens" (x: LongTensor [N, L], right-padded with `pad_id`) or "image"
    (x: FloatTensor [N, ...]).

    `objective` says how the learner trains on it:
    - "classify": y is a class id per sample; models return logits [B, num_classes];
    - "lm": y is a LongTensor [N, L] of next-token targets aligned with x (-100 = no loss there);
      models are causal LMs returning [B, L, vocab]. Such streams bring a `scorer(model,
      experience) -> float` that fills R (exact match, accuracy of ranked answers, perplexity...),
      and say whether that score is `higher_is_better`.
    """

    name: str
    experiences: list[Experience]
    num_classes: int
    input_kind: str = "tokens"
    vocab_size: int | None = None
    pad_id: int = 0
    class_names: list[str] = field(default_factory=list)
    scenario: str = "class_incremental"
    objective: str = "classify"
    scorer: Callable | None = None
    metric_name: str = "accuracy"
    higher_is_better: bool = True

    def __len__(self) -> int:
        return len(self.experiences)

    def classes_seen(self, upto: int) -> list[int]:
        """Classes of experiences 0..upto inclusive."""
        seen: list[int] = []
        for e in self.experiences[: upto + 1]:
            seen.extend(c for c in e.classes if c not in seen)
        return seen

    def hold_out_validation(self, per_class: int, seed: int = 0, keep_test: bool = False) -> "TaskStream":
        """Replace every experience's test set by `per_class` training samples per class, removed from
        its training set (seeded). Tune hyperparameters on this, never on the test split.

        With `keep_test` the held-out samples become the experience's `val` set instead and the test set
        stays (the datamodule then serves them as validation dataloaders)."""
        if self.objective != "classify":
            raise StreamError(f"task.validation_per_class: stream '{self.name}' scores with its own scorer; "
                              "a validation split is only defined for classification streams")
        if per_class < 1:
            raise StreamError(f"task.validation_per_class: must be >= 1, got {per_class}")
        g = torch.Generator().manual_seed(seed)
        for e in self.experiences:
            val_idx, train_idx = [], []
            for c in e.classes:
                idx = torch.nonzero(e.train.y == c).flatten()
                if len(idx) <= per_class:
                    raise StreamError(f"task.validation_per_class={per_class}: class {c} of experience {e.index} "
                                      f"('{e.name}') has only {len(idx)} training samples; at least one must stay")
                idx = idx[torch.randperm(len(idx), generator=g)]
                val_idx.append(idx[:per_class])
                train_idx.append(idx[per_class:])
            held_out = e.train.subset(torch.cat(val_idx))
            if keep_test:
                e.val = held_out
            else:
                e.test = held_out
            e.train = e.train.subset(torch.cat(train_idx).sort().values)
        return self

    def validate(self) -> "TaskStream":
        if not self.experiences:
            raise StreamError(f"stream '{self.name}': has no experiences")
        seen: dict[int, str] = {}
        for e in self.experiences:
            if len(e.train) == 0:
                raise StreamError(f"stream '{self.name}': experience {e.index} ('{e.name}') has an empty training set")
            if len(e.test) == 0:
                raise StreamError(f"stream '{self.name}': experience {e.index} ('{e.name}') has an empty test set")
            if not e.classes:
                raise StreamError(f"stream '{self.name}': experience {e.index} ('{e.name}') introduces no classes")
            bad = [c for c in e.classes if not 0 <= c < self.num_classes]
            if bad:
                raise StreamError(f"stream '{self.name}': experience {e.index} has classes {bad} outside 0..{self.num_classes - 1}")
            if self.objective == "lm":
                continue  # classes name the facts/domains an experience adds; labels are tokens
            if self.scenario == "class_incremental":
                for c in e.classes:
                    if c in seen:
                        raise StreamError(
                            f"stream '{self.name}': class {c} appears in experience {e.index} ('{e.name}') "
                            f"and in '{seen[c]}': class-incremental experiences must not overlap")
                    seen[c] = e.name
            for split, ds in (("train", e.train), ("test", e.test)):
                labels = set(torch.unique(ds.y).tolist())
                if not labels <= set(e.classes):
                    raise StreamError(
                        f"stream '{self.name}': experience {e.index} {split} set has labels "
                        f"{sorted(labels - set(e.classes))} not in its classes")
        return self
