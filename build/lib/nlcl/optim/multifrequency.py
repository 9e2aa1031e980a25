"""Multi-frequency (level-aware) stepping: paper Eq. 71 for `step`-unit levels.

Every trainable parameter belongs to a level (see `nlcl.levels`). Each level gets its own inner
optimizer. A level with period C steps its optimizer only when the global step counter is a multiple
of C; in between, nobody zeroes its gradients, so autograd keeps *summing* them into `.grad`. Since
the level's parameters do not move inside the period, every summand is taken at the period-start
parameters, which is exactly Eq. 71:

    theta_{i+1} = theta_i - sum_{t in period} eta f(theta_period_start; x_t)   if i = 0 mod C

A level with period 1 is just its inner optimizer, so a model without tags trains exactly like the
plain optimizer.

Caveats for the training loop (they follow from "grads are the level's memory"):
- gradient clipping on `param_groups` clips the running sums of the slow levels, not single steps;
- fp16 loss scaling (GradScaler) unscales `.grad` in place at every step, which corrupts a sum that
  spans several steps: use bf16 or fp32 when any period is > 1.
"""
from __future__ import annotations

from collections.abc import Callable, MutableMapping
from itertools import chain

import torch
from torch import nn

from nlcl.levels import LevelSpec, parameter_levels


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """l2 norm of a list of tensors seen as one vector (stays on device: no host sync)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


class _LevelStates(MutableMapping):
    """`optimizer.state` of the wrapper: each parameter's state lives in its level's optimizer.

    Lets code that walks `optimizer.state` (Lightning moving state to a device, users inspecting
    moments) see the inner states.
    """

    def __init__(self, owner: dict[torch.Tensor, torch.optim.Optimizer]):
        self.owner = owner

    def _optimizers(self):
        return list({id(o): o for o in self.owner.values()}.values())

    def __getitem__(self, p):
        return self.owner[p].state[p]

    def __setitem__(self, p, value):
        self.owner[p].state[p] = value

    def __delitem__(self, p):
        del self.owner[p].state[p]

    def __iter__(self):
        return chain.from_iterable(list(o.state.keys()) for o in self._optimizers())

    def __len__(self):
        return sum(len(o.state) for o in self._optimizers())


class MultiFrequencyOptimizer(torch.optim.Optimizer):
    """One inner optimizer per level; a level steps (and zeroes its grads) when its period ends.

    model:          the module whose trainable parameters are optimized, grouped by `parameter_levels`.
    make_optimizer: builds a level's optimizer from its param groups `[{"params": [...], "lr": ...}]`.
    lr:             base learning rate; a level's groups get `lr * spec.lr_scale`.
    track_update_norm: keep a copy of a level's parameters while it steps, to report the norm of the
                    change (costs one transient copy of the level's parameters per level step).
    """

    # The learner must not zero gradients: the slow levels' gradient sums are their memory.
    manages_zero_grad = True

    def __init__(self, model: nn.Module,
                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                 lr: float, track_update_norm: bool = True):
        named = dict(model.named_parameters(remove_duplicate=False))
        self.levels: dict[str, LevelSpec] = {}
        params_of: dict[str, list[nn.Parameter]] = {}
        level_of: dict[int, str] = {}  # a tied parameter appears under several names: keep it once
        for name, spec in parameter_levels(model).items():
            known = self.levels.setdefault(spec.name, spec)
            if known != spec:
                raise ValueError(f"two different levels are named '{spec.name}': {known} and {spec}")
            p = named[name]
            if id(p) in level_of:
                if level_of[id(p)] != spec.name:
                    raise ValueError(f"parameter '{name}' is tied to a parameter of level "
                                     f"'{level_of[id(p)]}' but is tagged '{spec.name}'")
                continue
            level_of[id(p)] = spec.name
            params_of.setdefault(spec.name, []).append(p)
        if not params_of:
            raise ValueError("MultiFrequencyOptimizer: the model has no trainable parameters")
        self.levels = {level: self.levels[level] for level in params_of}

        self.inner: dict[str, torch.optim.Optimizer] = {
            level: make_optimizer([{"params": ps, "lr": lr * self.levels[level].lr_scale}])
            for level, ps in params_of.items()}
        self.step_count = 0
        self.track_update_norm = track_update_norm
        self._stats = {level: {"updates": 0, "grad_norm": torch.zeros(()),
                               "update_norm": torch.zeros(())} for level in self.inner}

        all_params = [p for ps in params_of.values() for p in ps]
        super().__init__(all_params, defaults={"lr": lr})
        # The wrapper owns no groups or state of its own: it shows the inner ones, so LR schedulers,
        # gradient clipping and device moves reach every parameter of every level.
        self.param_groups = []
        self._refresh_param_groups()
        owner = {p: opt for opt in self.inner.values() for g in opt.param_groups for p in g["params"]}
        self.state = _LevelStates(owner)

    def _refresh_param_groups(self):
        # In place: anyone holding the list (a scheduler) sees the groups of reloaded inner optimizers.
        self.param_groups[:] = [g for opt in self.inner.values() for g in opt.param_groups]

    def level_params(self, level: str) -> list[torch.Tensor]:
        return [p for g in self.inner[level].param_groups for p in g["params"]]

    def due_levels(self, step: int) -> list[str]:
        """Levels whose period ends at (1-based) step `step`."""
        return [level for level, spec in self.levels.items() if step % spec.period == 0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_count += 1
        for level in self.due_levels(self.step_count):
            self._step_level(level)
        return loss

    def _step_level(self, level: str):
        params = self.level_params(level)
        stats = self._stats[level]
        stats["grad_norm"] = _global_norm([p.grad for p in params if p.grad is not None])
        before = [p.detach().clone() for p in params] if self.track_update_norm else None
        self.inner[level].step()
        if before is not None:
            stats["update_norm"] = _global_norm([p.detach() - b for p, b in zip(params, before)])
        stats["updates"] += 1
        for p in params:  # the period is over: the next one starts a fresh sum
            p.grad = None

    def zero_grad(self, set_to_none: bool = True):
        """Deliberately a no-op.

        Each level zeroes its own gradients right after it steps; zeroing here would erase the
        gradient sums that the slower levels are still accumulating (Eq. 71).
        """

    # ---- telemetry ----
    def level_stats(self) -> dict[str, dict]:
        """Per level: `updates` (int: how many times it stepped), `grad_norm` (norm of the summed
        gradient it stepped with, last time) and `update_norm` (norm of its last parameter change),
        the norms as 0-d tensors on the parameters' device (no host sync)."""
        return {level: dict(s) for level, s in self._stats.items()}

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        """Inner optimizers' states, the step counter and the not-yet-applied gradient sums.

        Holds only tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)`
        reads it back.
        """
        levels = {}
        for level, opt in self.inner.items():
            spec, stats = self.levels[level], self._stats[level]
            levels[level] = {
                "period": spec.period,
                "optimizer": opt.state_dict(),
                "grads": [None if p.grad is None else p.grad.detach().clone() for p in self.level_params(level)],
                "updates": stats["updates"],
                "grad_norm": stats["grad_norm"],
                "update_norm": stats["update_norm"],
            }
        return {"step_count": self.step_count, "levels": levels}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["levels"]
        if set(saved) != set(self.inner):
            raise ValueError(f"checkpoint levels {sorted(saved)} do not match the model's {sorted(self.inner)}")
        for level, opt in self.inner.items():
            entry = saved[level]
            if entry["period"] != self.levels[level].period:
                raise ValueError(f"level '{level}': checkpoint period {entry['period']} "
                                 f"!= current period {self.levels[level].period}")
            params = self.level_params(level)
            if len(entry["grads"]) != len(params):
                raise ValueError(f"level '{level}': checkpoint has {len(entry['grads'])} gradients "
                                 f"for {len(params)} parameters")
            opt.load_state_dict(entry["optimizer"])
            for p, g in zip(params, entry["grads"]):
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()
            self._stats[level] = {"updates": int(entry["updates"]),
                                  "grad_norm": entry["grad_norm"], "update_norm": entry["update_norm"]}
        self.step_count = int(state_dict["step_count"])
        self._refresh_param_groups()

    def __getstate__(self):  # pickling/deepcopy must keep the inner optimizers and the counter
        return dict(self.__dict__)
