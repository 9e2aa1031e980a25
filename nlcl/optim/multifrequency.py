"""Multi-frequency (level-aware) stepping: paper Eq. 71 for `step`-unit levels.

Every trainable parameter belongs to a level (see `nlcl.levels`). Each level gets its own inner
optimizer. A level with period P applies an update only when the step counter is a multiple of P;
in between its parameters stay put, so every gradient of the period is taken at the period-start
parameters, as Eq. 71 asks:

    theta_{i+1} = theta_i - sum_{t in period} eta f(theta_period_start; x_t)   if i = 0 mod P

What a level collects during its period lives in this optimizer's own per-level state (the
*accumulator*), never in `p.grad`. `.grad` holds the current step's gradient only and is zeroed as
usual after every step, so anything that acts on `.grad` (gradient clipping, fp16 loss-scale
unscaling, A-GEM's projection, gradient accumulation) acts on one step's fresh gradient, never on
a level's pending sum.

How a slow level accumulates (`accumulation`):
- "gradient" (default): the accumulator sums the raw gradients (Eq. 71) and the inner optimizer
  steps once when the period ends. Scaling rule, applied automatically so that a period moves about
  as far as P steps would: an optimizer whose step is linear in the gradient (SGD, DGD, the
  delta-rule momenta) steps on the sum at its own rate -- that already is P steps' worth; an
  optimizer that normalises the gradient away (AdamW, Muon: step size independent of the
  gradient's size; M3: step size shrinks as the gradient grows) steps on the period's *mean*
  gradient at P times its rate. For a linear optimizer the two forms are the same step.
- "gradient_literal": Eq. 71's sum with no scaling rule. Under AdamW/Muon a slow level then moves
  about 1/P as far per step as a fast one (what runs before this option existed did).
- "update": every step the inner optimizer computes its update from the fresh gradient at the
  period-start parameters (its state -- moments, momentum -- advances every step); the update is
  added to the accumulator and the parameters are put back. At period end the accumulated updates
  are applied at once. The period then moves exactly as far as P plain steps whose gradients were
  all taken at the period-start weights, for any inner optimizer.
A period-1 level is its inner optimizer, unchanged, in every mode.

After each step the optimizer announces which levels applied an update (`subscribe`); modules that
act on a level's schedule (the nested CMS resets) listen to that instead of counting batches.
"""
from __future__ import annotations

from collections.abc import Callable, MutableMapping
from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn

from nlcl.levels import LevelSpec, parameter_levels

ACCUMULATIONS = ("gradient", "gradient_literal", "update")


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """l2 norm of a list of tensors seen as one vector (stays on device: no host sync)."""
    tensors = [t for t in tensors if t is not None]
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
    """One inner optimizer per level; a level applies its accumulated period when the period ends.

    model:          the module whose trainable parameters are optimized, grouped by `parameter_levels`.
    make_optimizer: builds a level's optimizer from its param groups `[{"params": [...], "lr": ...}]`.
    lr:             base learning rate; a level's groups get `lr * spec.lr_scale`.
    accumulation:   "gradient" | "gradient_literal" | "update" (module docstring).
    normalizes_gradient: the inner optimizer's step is not linear in the gradient's size (AdamW,
                    Muon, M3); "gradient" accumulation then steps a slow level on its period's mean
                    gradient at its rate times the period.
    track_update_norm: keep a copy of a level's parameters while it steps, to report the norm of the
                    change (costs one transient copy of the level's parameters per level step).
    """

    def __init__(self, model: nn.Module,
                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                 lr: float, track_update_norm: bool = True, accumulation: str = "gradient",
                 normalizes_gradient: bool = False):
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"optim.level_accumulation: '{accumulation}' is not one of {ACCUMULATIONS}")
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
        self.accumulation = accumulation
        self.normalizes_gradient = bool(normalizes_gradient)
        self.step_count = 0
        self.track_update_norm = track_update_norm
        # a level's pending period: one tensor (or None: no gradient yet) per parameter
        self.accumulators: dict[str, list[torch.Tensor | None]] = {
            level: [None] * len(ps) for level, ps in params_of.items() if self.levels[level].period > 1}
        self._stats = {level: self._fresh_stats(ps) for level, ps in params_of.items()}
        self._subscribers: list[Callable[[list[str], int], None]] = []

        all_params = [p for ps in params_of.values() for p in ps]
        super().__init__(all_params, defaults={"lr": lr})
        # The wrapper owns no groups or state of its own: it shows the inner ones, so LR schedulers,
        # gradient clipping, zero_grad and device moves reach every parameter of every level.
        self.param_groups = []
        self._refresh_param_groups()
        owner = {p: opt for opt in self.inner.values() for g in opt.param_groups for p in g["params"]}
        self.state = _LevelStates(owner)

    @staticmethod
    def _fresh_stats(params) -> dict:
        return {"updates": 0, "grad_norm": torch.zeros(()), "update_norm": torch.zeros(()),
                "path_length": torch.zeros(()), "n_params": sum(p.numel() for p in params)}

    def _refresh_param_groups(self):
        # In place: anyone holding the list (a scheduler) sees the groups of reloaded inner optimizers.
        self.param_groups[:] = [g for opt in self.inner.values() for g in opt.param_groups]

    def level_params(self, level: str) -> list[torch.Tensor]:
        return [p for g in self.inner[level].param_groups for p in g["params"]]

    def subscribe(self, callback: Callable[[list[str], int], None]) -> None:
        """Call `callback(levels_that_stepped, step_count)` after every step (also with an empty list)."""
        self._subscribers.append(callback)

    # ---- stepping ----
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_count += 1
        stepped = []
        for level, spec in self.levels.items():
            due = self.step_count % spec.period == 0
            if spec.period == 1:
                self._plain_step(level)
            elif self.accumulation == "update":
                self._accumulate_update(level)
                if due:
                    self._apply_updates(level)
            else:
                self._accumulate_gradient(level)
                if due:
                    self._apply_gradient_sum(level)
            if due:
                stepped.append(level)
        for callback in self._subscribers:
            callback(stepped, self.step_count)
        return loss

    def _record(self, level: str, grad_norm: torch.Tensor, change_norm: torch.Tensor | None):
        stats = self._stats[level]
        stats["grad_norm"] = grad_norm
        if change_norm is not None:
            stats["update_norm"] = change_norm
            stats["path_length"] = stats["path_length"].to(change_norm.device) + change_norm
        stats["updates"] += 1

    def _inner_step_tracked(self, level: str) -> torch.Tensor | None:
        params = self.level_params(level)
        before = [p.detach().clone() for p in params] if self.track_update_norm else None
        self.inner[level].step()
        if before is None:
            return None
        return _global_norm([p.detach() - b for p, b in zip(params, before)])

    def _plain_step(self, level: str):
        grad_norm = _global_norm([p.grad for p in self.level_params(level)])
        self._record(level, grad_norm, self._inner_step_tracked(level))

    def _accumulate_gradient(self, level: str):
        acc = self.accumulators[level]
        for i, p in enumerate(self.level_params(level)):
            if p.grad is not None:
                acc[i] = p.grad.detach().clone() if acc[i] is None else acc[i].add_(p.grad)

    @contextmanager
    def _lr_times(self, level: str, factor: float):
        groups = self.inner[level].param_groups
        saved = [g["lr"] for g in groups]
        try:
            for g in groups:
                g["lr"] = g["lr"] * factor
            yield
        finally:  # the saved values, not lr * factor / factor: schedulers see their own numbers
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    def _apply_gradient_sum(self, level: str):
        params, acc = self.level_params(level), self.accumulators[level]
        period = self.levels[level].period
        rescale = self.accumulation == "gradient" and self.normalizes_gradient
        fresh = [p.grad for p in params]
        for p, a in zip(params, acc):  # the inner optimizer reads .grad: lend it the period's sum (or mean)
            p.grad = a.div_(period) if (rescale and a is not None) else a
        with self._lr_times(level, period if rescale else 1):
            change = self._inner_step_tracked(level)
        for p, g in zip(params, fresh):
            p.grad = g
        summed = _global_norm(acc)
        self._record(level, summed * period if rescale else summed, change)
        self.accumulators[level] = [None] * len(params)

    def _accumulate_update(self, level: str):
        params, acc = self.level_params(level), self.accumulators[level]
        start = [p.detach().clone() for p in params]  # the period-start weights
        self.inner[level].step()
        for i, (p, s) in enumerate(zip(params, start)):
            delta = p.detach() - s
            acc[i] = delta if acc[i] is None else acc[i].add_(delta)
            p.copy_(s)
        self._stats[level]["grad_norm"] = _global_norm([p.grad for p in params])

    def _apply_updates(self, level: str):
        params, acc = self.level_params(level), self.accumulators[level]
        for p, a in zip(params, acc):
            p.add_(a)
        self._record(level, self._stats[level]["grad_norm"], _global_norm(acc))
        self.accumulators[level] = [None] * len(params)

    # ---- telemetry ----
    def reference_level(self) -> str:
        """The period-1 level step sizes are compared with: the largest one (usually `outer`)."""
        fast = [lv for lv, spec in self.levels.items() if spec.period == 1] or list(self.levels)
        return max(fast, key=lambda lv: self._stats[lv]["n_params"])

    def level_stats(self) -> dict[str, dict]:
        """Per level: `updates` (int: how many times it applied an update), `grad_norm` (norm of the
        gradient it last stepped with: the period's sum in the gradient modes, the period's last
        fresh gradient in "update" mode), `update_norm` (norm of its last parameter change),
        `path_length` (sum of the norms of all its changes), `n_params`, and

        - `step_rms`: its effective step size, path_length / (optimizer steps * sqrt(n_params)),
          the root-mean-square distance per parameter per optimizer step over the whole stretch;
        - `relative_step`: step_rms / step_rms of the period-1 reference level (`reference_level`)
          over the same steps. A slow level that learns "the same at lower frequency" sits near its
          lr scale (near 1 with lr scale 1) under normalising optimizers (AdamW, Muon); one near
          1/P does not keep up. Under SGD it also carries the levels' gradient sizes.

        The norms as 0-d tensors on the parameters' device (no host sync)."""
        steps = max(self.step_count, 1)
        rms = {lv: s["path_length"] / (steps * max(s["n_params"], 1) ** 0.5) for lv, s in self._stats.items()}
        ref = rms[self.reference_level()]
        out = {}
        for level, s in self._stats.items():
            out[level] = {**s, "step_rms": rms[level],
                          "relative_step": rms[level].to(ref.device) / ref.clamp(min=1e-30)}
        return out

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        """Inner optimizers' states, the step counter and the not-yet-applied accumulators.

        Holds only tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)`
        reads it back.
        """
        levels = {}
        for level, opt in self.inner.items():
            spec, stats = self.levels[level], self._stats[level]
            acc = self.accumulators.get(level, [])
            levels[level] = {
                "period": spec.period,
                "optimizer": opt.state_dict(),
                "accumulator": [None if a is None else a.detach().clone() for a in acc],
                **{k: stats[k] for k in ("updates", "grad_norm", "update_norm", "path_length")},
            }
        return {"step_count": self.step_count, "accumulation": self.accumulation, "levels": levels}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["levels"]
        if set(saved) != set(self.inner):
            raise ValueError(f"checkpoint levels {sorted(saved)} do not match the model's {sorted(self.inner)}")
        if state_dict.get("accumulation", self.accumulation) != self.accumulation:
            raise ValueError(f"optim.level_accumulation: checkpoint used '{state_dict['accumulation']}', "
                             f"this run '{self.accumulation}'")
        for level, opt in self.inner.items():
            entry = saved[level]
            if entry["period"] != self.levels[level].period:
                raise ValueError(f"level '{level}': checkpoint period {entry['period']} "
                                 f"!= current period {self.levels[level].period}")
            params = self.level_params(level)
            acc = entry["accumulator"]
            if level in self.accumulators:
                if len(acc) != len(params):
                    raise ValueError(f"level '{level}': checkpoint has {len(acc)} accumulators "
                                     f"for {len(params)} parameters")
                self.accumulators[level] = [None if a is None else a.to(device=p.device, dtype=p.dtype).clone()
                                            for p, a in zip(params, acc)]
            opt.load_state_dict(entry["optimizer"])
            stats = self._stats[level]
            stats["updates"] = int(entry["updates"])
            for k in ("grad_norm", "update_norm", "path_length"):
                stats[k] = entry[k]
        self.step_count = int(state_dict["step_count"])
        self._refresh_param_groups()

    def __getstate__(self):  # pickling/deepcopy must keep the inner optimizers and the counter
        return dict(self.__dict__)
