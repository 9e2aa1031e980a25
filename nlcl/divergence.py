"""Divergence is an outcome: the first non-finite loss term, gradient or parameter stops the run.

`DivergenceGuard` is a Lightning callback. Its choice of when to look, so that training never waits
for the host:
- every step, on the device and without a host sync, it records whether each loss term (task,
  then each strategy's term) and each level's gradient is finite, and keeps the step, the flags
  and the loss values of the FIRST step where something was not (a handful of tiny kernels and
  one fused norm per level over the gradients);
- every `check_every` steps (the learner's logging interval, already a sync point) and at the end
  of every experience's training, it reads that record once, checks the parameters of every
  level, and raises `Diverged` naming experience, step, level and loss term.
A run therefore stops at most `check_every` steps after it went non-finite, and no state of a
diverged model is ever saved (the runner saves after training, the guard raises before).
A gradient norm that overflows float32 counts as non-finite. Under 16-bit mixed precision the
grad scaler skips steps with inf gradients on purpose, so there only losses and parameters count.
"""
from __future__ import annotations

import math

import lightning as L
import torch

from nlcl import distributed as D


class Diverged(RuntimeError):
    """Training produced a non-finite value; `info` says where (for results.json)."""

    def __init__(self, info: dict):
        self.info = info
        super().__init__(describe(info))


def describe(info: dict) -> str:
    what = info["kind"] + (f" '{info['term']}'" if info.get("term") else "") + \
        (f" of level '{info['level']}'" if info.get("level") else "")
    where = f"experience {info['experience']}, step {info['step']}" + (f", rank {info['rank']}" if "rank" in info else "")
    losses = info.get("losses") or {}
    shown = ", ".join(f"{k}={v}" for k, v in losses.items())
    return f"diverged at {where}: non-finite {what}" + (f" (loss terms: {shown})" if shown else "")


def _levels(learner) -> dict[str, list[torch.Tensor]]:
    opt = learner.optimizer
    if hasattr(opt, "levels") and hasattr(opt, "level_params"):
        return {level: opt.level_params(level) for level in opt.levels}
    return {"outer": [p for g in opt.param_groups for p in g["params"]]}


def _all_finite(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """One bool tensor: every element of every tensor is finite (via fused norms, no host sync)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(t, DTensor) for t in tensors)
    if sharded:  # trainer.strategy=fsdp: each rank checks its shards, and the ranks agree (one all-reduce)
        tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    norms = torch._foreach_norm(tensors)
    finite = torch.stack([n.float() for n in norms]).isfinite().all()
    if sharded:
        from nlcl import distributed as D

        bad = (~finite).long()
        D.all_reduce_sum_([bad])
        finite = bad == 0
    return finite


def _as_float(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # 'nan', 'inf', '-inf': valid JSON, and readable


class DivergenceGuard(L.Callback):
    def __init__(self, check_every: int = 25):
        self.check_every = max(1, int(check_every))
        self._record = None

    # names of the flags, in a fixed order for one fit: loss terms, then gradient levels
    def on_train_start(self, trainer, learner):
        from nlcl.strategies.base import Strategy

        self.terms = ["task"] + [s.name for s in learner.strategies  # those that add a loss term
                                 if type(s).extra_loss is not Strategy.extra_loss]
        self.levels = _levels(learner)
        self.check_grads = "16" not in str(trainer.precision)
        device = learner.device
        k = len(self.terms) + len(self.levels)
        self._step = torch.full((), learner.total_steps, dtype=torch.long, device=device)
        self._first_step = torch.full((), -1, dtype=torch.long, device=device)
        self._first_flags = torch.zeros(k, dtype=torch.bool, device=device)
        self._first_losses = torch.zeros(len(self.terms), device=device)

    def on_before_optimizer_step(self, trainer, learner, optimizer):
        device = self._step.device
        self._step = self._step + 1
        terms = getattr(learner, "loss_terms", {}) or {}
        zero = torch.zeros((), device=device)
        losses = torch.stack([terms.get(t, zero).detach().float().reshape(()) for t in self.terms])
        bad = [~losses.isfinite()]
        if self.check_grads:
            bad.append(torch.stack([~_all_finite([p.grad for p in ps], device) for ps in self.levels.values()]))
        else:
            bad.append(torch.zeros(len(self.levels), dtype=torch.bool, device=device))
        bad = torch.cat(bad)
        newly = bad.any() & (self._first_step < 0)
        self._first_step = torch.where(newly, self._step, self._first_step)
        self._first_flags = torch.where(newly, bad, self._first_flags)
        self._first_losses = torch.where(newly, losses, self._first_losses)

    def on_train_batch_end(self, trainer, learner, outputs, batch, batch_idx):
        # the learner's own hook (which counts total_steps) runs after the callbacks'
        if (learner.total_steps + 1) % self.check_every == 0:
            self.check(learner)

    def on_train_end(self, trainer, learner):
        self.check(learner)

    def check(self, learner) -> None:
        """The one host sync: raise `Diverged` if any step so far, or the parameters now, were not
        finite. With several processes every rank decides together (one small all-reduce, at a
        step every rank reaches): a value that went non-finite on one rank only (its own loss term,
        or steps a 16-bit grad scaler skipped elsewhere) stops every rank, and no rank is left
        waiting in the next step's gradient all-reduce for a rank that stopped."""
        info = self._problem(learner)
        if D.active():
            flag = torch.tensor([0 if info is None else 1])
            if int(D.all_reduce_sum_([flag])[0]):
                found = [dict(i, rank=r) for r, i in enumerate(D.all_gather_objects(info)) if i is not None]
                info = min(found, key=lambda i: (i["step"], i["rank"]))  # the earliest, as one rank saw it
        if info is not None:
            raise Diverged(info)

    def _problem(self, learner) -> dict | None:
        """What this process saw: the first non-finite step it recorded, else a non-finite parameter."""
        first = int(self._first_step)
        if first >= 0:
            flags = self._first_flags.tolist()
            losses = {t: _as_float(float(v)) for t, v in zip(self.terms, self._first_losses.tolist())}
            n = len(self.terms)
            bad_terms = [t for t, f in zip(self.terms, flags[:n]) if f]
            bad_levels = [lv for lv, f in zip(self.levels, flags[n:]) if f]
            if bad_terms:  # a non-finite loss explains its gradients: name the loss term
                info = {"kind": "loss", "term": bad_terms[0], "level": bad_levels[0] if bad_levels else None}
            else:
                info = {"kind": "gradient", "term": None, "level": bad_levels[0]}
            return {**info, "experience": learner.experience, "step": first, "losses": losses,
                    "non_finite_terms": bad_terms, "non_finite_levels": bad_levels}
        device = self._step.device
        for level, ps in self.levels.items():
            if not bool(_all_finite(list(ps), device)):
                return {"kind": "parameter", "term": None, "level": level, "experience": learner.experience,
                        "step": learner.total_steps, "losses": {}, "non_finite_terms": [],
                        "non_finite_levels": [level]}
        return None
