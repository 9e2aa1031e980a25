"""The LightningModule that hosts any classifier and owns the optimizer hooks.

- Class-incremental training masks the logits to the classes seen so far (`seen_mask`).
- Strategies add their terms through `Strategy.extra_loss`.
- A model with token-unit (in-context) CMS levels gets the batch's targets with its inputs, so its
  fast levels learn from the task loss (e.g. answer tokens only), not from next-input prediction.
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

from nlcl.models.telemetry import collect_mechanism_stats

NEG = -1e9  # stand-in for -inf that keeps softmax finite in every dtype we use


class Learner(L.LightningModule):
    def __init__(self, model: nn.Module, num_classes: int,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 strategies: Sequence = (), log_every: int = 25, mask_unseen: bool = True,
                 objective: str = "classify", shard: Callable | None = None):
        super().__init__()
        self.model = model
        # trainer.strategy=fsdp: `shard(model, mesh)` runs in configure_model, inside each rank, and the
        # optimizer is built after it, over the sharded parameters (see nlcl.sharding)
        self.shard = shard
        self.make_optimizer = make_optimizer
        self._pending_optimizer_shards = None  # a resumed sharded run's optimizer state, loaded once built
        self.strategies = list(strategies)
        self.log_every = log_every
        self.mask_unseen = mask_unseen
        self.objective = objective
        self.register_buffer("seen_mask", torch.zeros(num_classes, dtype=torch.bool))
        # built once: its state lives across experiences
        self.optimizer = make_optimizer(model) if shard is None else None
        self.total_steps = 0
        self.experience = -1
        self.batch_scale = 1.0  # this rank's weight of the current step's batch-mean losses
        self.batch_share = None  # (this rank's samples, global batch samples) under several ranks
        self._loss_sum = torch.zeros(())
        self._loss_count = 0
        self.loss_terms: dict[str, torch.Tensor] = {}

    # ---- experience bookkeeping (called by the runner) ----
    def start_experience(self, index: int, seen_classes: Sequence[int]) -> None:
        self.experience = index
        self.seen_mask.zero_()
        self.seen_mask[list(seen_classes)] = True

    # ---- forward and loss ----
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Models with in-context levels (`learns_from_targets`) learn from the task's targets `y`
        when given (next tokens, answer masks); every other model sees the inputs only."""
        if y is not None and getattr(self.model, "learns_from_targets", False):
            return self.model(x, y)
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
        logits = self(x, y)
        loss = self.task_loss(logits, y)
        self.batch_scale = self._batch_scale(batch_idx)
        if self.batch_scale != 1.0:  # several ranks: see _batch_scale
            loss = loss * self.batch_scale
        self.loss_terms = {"task": loss}  # each term by name, for the divergence guard
        for strategy in self.strategies:
            extra = strategy.extra_loss(self, batch, logits)
            if extra is not None:
                self.loss_terms[strategy.name] = extra
                loss = loss + extra
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
        self._loss_count += 1
        return loss

    def _batch_scale(self, batch_idx: int) -> float:
        """On N ranks each takes a share of the global batch and DDP averages the ranks' gradients, so a
        share's mean loss is weighted by share / global * N: the average is then the global batch's mean
        (a stand-in sample on an empty share gets 0). 1.0 on one process. No communication: the sizes
        follow from the datamodule's batch plan."""
        self.batch_share = None
        if self._trainer is None or self.trainer.world_size == 1:
            return 1.0
        dm = self.trainer.datamodule
        if not hasattr(dm, "batch_share"):
            return 1.0
        n_local, n_global = dm.batch_share(batch_idx)
        self.batch_share = (n_local, n_global)
        return n_local * self.trainer.world_size / n_global

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.total_steps += 1
        if self.total_steps % self.log_every == 0:
            self.log_metrics({"train/loss": self._loss_sum / max(self._loss_count, 1),
                              "train/experience": self.experience})
            self._loss_sum, self._loss_count = torch.zeros(()), 0
            stats = getattr(self.optimizer, "level_stats", None)
            if stats is not None:
                self.log_metrics(flatten_level_stats(stats()))
            mechanism = collect_mechanism_stats(self.model, reset=False)  # this experience so far
            if mechanism:
                self.log_metrics({f"mechanism/{layer}/{k}": v for layer, d in mechanism.items() for k, v in d.items()})

    # ---- validation (when the datamodule serves validation sets): class-IL accuracy per experience ----
    def on_validation_epoch_start(self):
        self._val_counts: dict[int, torch.Tensor] = {}

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch[0], batch[1]
        hit = (self.masked(self(x).float()).argmax(-1) == y).sum().float()
        count = self._val_counts.setdefault(dataloader_idx, torch.zeros(2, device=y.device))
        count += torch.stack([hit, torch.tensor(float(len(y)), device=y.device)])

    def on_validation_epoch_end(self):
        if not self._val_counts:
            return
        keys = sorted(self._val_counts)
        counts = self.trainer.strategy.reduce(torch.stack([self._val_counts[k] for k in keys]), reduce_op="sum")
        self.log_metrics({f"val/acc_exp{k}": c[0] / c[1].clamp_min(1) for k, c in zip(keys, counts)})

    def log_metrics(self, metrics: dict) -> None:
        """Log against our monotone step counter (host sync happens here, outside forward/backward)."""
        if self._trainer is None:
            return
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.total_steps)

    # ---- parameter sharding (trainer.strategy=fsdp) and optimizer hooks ----
    @property
    def sharded(self) -> bool:
        return self.optimizer is not None and self.shard is not None

    def configure_model(self):
        """Lightning calls this in every rank at the start of each fit; the model is sharded at the
        first one and stays so (later experiences' Trainers find it sharded)."""
        if self.shard is None or self.sharded:
            return
        mesh = self.device_mesh["data_parallel"]
        self.shard(self.model, mesh)
        self.optimizer = self.make_optimizer(self.model)
        if self._pending_optimizer_shards is not None:
            from nlcl.sharding import from_local

            self.optimizer.load_state_dict(from_local(self._pending_optimizer_shards, mesh, self.device))
            self._pending_optimizer_shards = None

    def configure_optimizers(self):
        return self.optimizer

    # ---- state that a resume needs beyond Lightning's own ----
    def run_state(self) -> dict:
        """Under sharding every rank must call this (it gathers): the whole model, as on one process,
        and the optimizer as every rank's own shards, in rank order (meaningful on rank 0)."""
        if self.shard is not None:
            return self._sharded_run_state()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "total_steps": self.total_steps, "experience": self.experience,
                "strategies": {type(s).__name__: s.state_dict() for s in self.strategies}}

    def _sharded_run_state(self) -> dict:
        from nlcl import distributed as D
        from nlcl.sharding import full_model_state, to_local

        if not self.sharded:  # not trained yet (no fit so far): the model is whole, nothing to gather
            model, shards = self.model.state_dict(), self._pending_optimizer_shards
            shards = D.gather_objects(shards)
        else:
            model = full_model_state(self.model)
            shards = D.gather_objects(to_local(self.optimizer.state_dict()))
        return {"model": model, "optimizer_shards": shards, "world_size": D.world_size(),
                "total_steps": self.total_steps, "experience": self.experience,
                "strategies": {type(s).__name__: s.state_dict() for s in self.strategies}}

    def load_run_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])  # the whole model: sharded again at the next fit
        if self.shard is not None or "optimizer_shards" in state:
            self._load_optimizer_shards(state)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.total_steps = int(state["total_steps"])
        self.experience = int(state["experience"])
        for s in self.strategies:
            s.load_state_dict(state["strategies"].get(type(s).__name__, {}))


    def _load_optimizer_shards(self, state: dict) -> None:
        from nlcl import distributed as D

        if self.shard is None or "optimizer_shards" not in state:
            saved = "sharded (trainer.strategy=fsdp)" if "optimizer_shards" in state else "not sharded"
            raise ValueError(f"the saved run is {saved}; resume it with the trainer.strategy it was started with")
        if int(state["world_size"]) != D.world_size():
            raise ValueError(f"the saved run's optimizer is sharded over {state['world_size']} processes; resume it "
                             f"with trainer.devices x trainer.num_nodes = {state['world_size']} (now {D.world_size()})")
        self._pending_optimizer_shards = state["optimizer_shards"][D.rank()]


def flatten_level_stats(stats: dict) -> dict:
    """{level: {stat: value}} -> {"levels/<level>/<stat>": value}."""
    out = {}
    for level, values in stats.items():
        for key, value in values.items():
            out[f"levels/{level}/{key}"] = value
    return out
