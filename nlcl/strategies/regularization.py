"""Regularisation strategies: online EWC, Synaptic Intelligence, Learning without Forgetting.

EWC and SI share one penalty: a quadratic pull of every trainable parameter towards its value at the
end of the last experience, weighted per coordinate by an importance (Fisher diagonal for EWC, path
integral for SI). Neither ever calls `.backward()` outside Lightning's step: a stray backward would
add to the `.grad` the coming optimizer step reads (this is also why avalanche's
`EWCPlugin.compute_importances`, which calls `optimizer.zero_grad()` and `loss.backward()`, is not
used here).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nlcl import distributed as D
from nlcl.streams.base import TaskStream
from nlcl.strategies.base import Strategy


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def quadratic_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                      importance: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_k importance_k * (theta_k - anchor_k)^2 over the parameters that have an anchor."""
    terms = [(importance[k] * (p.float() - anchor[k]).pow(2)).sum() for k, p in params.items() if k in anchor]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _to_device(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------
# EWC


def empirical_fisher(learner, data, batch_size: int = 64, max_samples: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over mini-batches of the squared gradient of the masked
    task loss (avalanche's estimator; per-batch, not per-sample, gradients). Uses autograd.grad, so
    the parameters' `.grad` is left alone."""
    model = learner.model
    params = trainable(model)
    device = next(iter(params.values())).device
    if max_samples is not None and max_samples < len(data):
        data = data.subset(torch.randperm(len(data))[:max_samples])
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    was_training = model.training
    model.eval()
    n_batches = 0
    rank, world = D.rank(), D.world_size()
    with torch.enable_grad():
        for j, (x, y) in enumerate(DataLoader(data, batch_size=batch_size, shuffle=False)):
            if j % world != rank:  # several ranks: each takes every world-th batch, sums are all-reduced
                continue
            x, y = x.to(device), y.to(device)
            loss = learner.task_loss(learner(x), y)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (k, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[k] += g.detach().float().pow(2)
            n_batches += 1
    model.train(was_training)
    if world > 1:
        D.all_reduce_sum_(list(fisher.values()))
        n_batches = int(D.all_reduce_sum_([torch.tensor([n_batches])])[0])
    return {k: f / max(n_batches, 1) for k, f in fisher.items()}


class EWC(Strategy):
    """Online EWC (Schwarz et al. 2018; avalanche's EWC "online" mode).

    After experience i: F <- decay_factor * F + Fisher_i and theta* <- theta. During later
    experiences the loss adds ewc_lambda / 2 * sum F (theta - theta*)^2 (avalanche writes the same
    penalty without the 1/2). Nothing is added during the first experience.
    """

    name = "ewc"

    def __init__(self, ewc_lambda: float = 100.0, decay_factor: float = 0.9, fisher_batch_size: int = 64,
                 fisher_max_samples: int | None = None):
        self.ewc_lambda = float(ewc_lambda)
        self.decay_factor = float(decay_factor)
        self.fisher_batch_size = int(fisher_batch_size)
        self.fisher_max_samples = None if fisher_max_samples is None else int(fisher_max_samples)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        params = trainable(model)
        if not self.anchor:
            return torch.zeros((), device=next(iter(params.values())).device)
        device = next(iter(params.values())).device
        if next(iter(self.anchor.values())).device != device:  # once, after a resume or a device move
            self.anchor, self.fisher = _to_device(self.anchor, device), _to_device(self.fisher, device)
        return 0.5 * self.ewc_lambda * quadratic_penalty(params, self.anchor, self.fisher)

    def extra_loss(self, learner, batch, logits):
        return self.penalty(learner.model) if self.anchor else None

    def after_experience(self, learner, stream: TaskStream, index: int) -> None:
        new = empirical_fisher(learner, stream.experiences[index].train, self.fisher_batch_size,
                               self.fisher_max_samples)
        self.fisher = {k: self.decay_factor * self.fisher[k].to(f.device) + f if k in self.fisher else f
                       for k, f in new.items()}
        self.anchor = {k: p.detach().float().clone() for k, p in trainable(learner.model).items()}

    def state_dict(self):
        return {"fisher": _cpu(self.fisher), "anchor": _cpu(self.anchor)}

    def load_state_dict(self, state):
        self.fisher = dict(state.get("fisher", {}))
        self.anchor = dict(state.get("anchor", {}))


# ---------------------------------------------------------------------------------------------
# SI


class SI(Strategy):
    """Synaptic Intelligence (Zenke et al. 2017).

    Every optimizer step adds -g * delta_theta to a running path integral omega, with g the `.grad`
    the optimizer is about to use and delta_theta the change that step makes. At the end of an
    experience each coordinate's importance grows by max(0, omega / (Delta^2 + xi)), Delta being its
    total change over the experience (negative contributions, from steps that moved against the
    gradient, count as unimportant). Later experiences add si_lambda * sum Omega (theta - theta*)^2
    (the paper's c, no 1/2).

    Under a multi-frequency optimizer `.grad` is always the step's fresh gradient; a slow level moves
    only when its period ends, so steps in between have delta_theta = 0 and add nothing, and its path
    integral credits each period's update to the period's last gradient.
    """

    name = "si"

    def __init__(self, si_lambda: float = 1.0, xi: float = 1e-3):
        self.si_lambda = float(si_lambda)
        self.xi = float(xi)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.omega: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        self._step = None  # (params before the step, grads the step uses)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        params = trainable(model)
        device = next(iter(params.values())).device
        if not self.anchor:
            return torch.zeros((), device=device)
        if next(iter(self.anchor.values())).device != device:
            self.anchor, self.importance = _to_device(self.anchor, device), _to_device(self.importance, device)
        return self.si_lambda * quadratic_penalty(params, self.anchor, self.importance)

    def extra_loss(self, learner, batch, logits):
        return self.penalty(learner.model) if self.anchor else None

    def before_experience(self, learner, stream, index):
        params = trainable(learner.model)
        self.start = {k: p.detach().float().clone() for k, p in params.items()}
        self.omega = {k: torch.zeros_like(v) for k, v in self.start.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = trainable(pl_module.model)
        self._step = ({k: p.detach().float().clone() for k, p in params.items()},
                      {k: p.grad.detach().float().clone() for k, p in params.items() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step is None:
            return
        before, grads = self._step
        self._step = None
        for k, p in trainable(pl_module.model).items():
            if k in grads and k in self.omega:
                self.omega[k] -= grads[k] * (p.detach().float() - before[k])

    def after_experience(self, learner, stream, index):
        params = trainable(learner.model)
        for k, p in params.items():
            if k not in self.omega:
                continue
            delta = p.detach().float() - self.start[k]
            gain = (self.omega[k] / (delta.pow(2) + self.xi)).clamp(min=0)
            self.importance[k] = self.importance[k].to(gain.device) + gain if k in self.importance else gain
        self.anchor = {k: p.detach().float().clone() for k, p in params.items()}

    def state_dict(self):
        return {"importance": _cpu(self.importance), "anchor": _cpu(self.anchor)}

    def load_state_dict(self, state):
        self.importance = dict(state.get("importance", {}))
        self.anchor = dict(state.get("anchor", {}))


# ---------------------------------------------------------------------------------------------
# LwF


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, classes: list[int] | torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) over `classes`, averaged over the batch
    (avalanche's LwF loss, times the usual T^2 that keeps gradient sizes independent of T)."""
    log_p = F.log_softmax(logits[:, classes].float() / temperature, dim=-1)
    q = F.softmax(teacher_logits[:, classes].float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_p, q, reduction="batchmean")


class LwF(Strategy):
    """Learning without Forgetting (Li & Hoiem 2016): from experience 1 on, a frozen copy of the model
    as it was at the start of the experience is the teacher on the previously seen classes, and the
    loss adds alpha * T^2 * KL(teacher || student) on them.

    No state to save: the runner resumes only at experience boundaries, where the teacher is just the
    restored model.
    """

    name = "lwf"

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.teacher: nn.Module | None = None
        self.old_classes: torch.Tensor | None = None

    def before_experience(self, learner, stream: TaskStream, index: int) -> None:
        if index == 0:
            self.teacher, self.old_classes = None, None
            return
        self.teacher = copy.deepcopy(learner.model).eval()
        self.teacher.requires_grad_(False)
        self.old_classes = torch.tensor(stream.classes_seen(index - 1), device=learner.device)

    def distillation(self, learner, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return torch.zeros((), device=logits.device)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        # batch mean over this rank's share, weighted so that the ranks' average is the global batch mean
        return self.alpha * getattr(learner, "batch_scale", 1.0) * distillation_loss(logits, teacher_logits, self.old_classes,
                                                                    self.temperature)

    def extra_loss(self, learner, batch, logits):
        return self.distillation(learner, batch[0], logits) if self.teacher is not None else None
