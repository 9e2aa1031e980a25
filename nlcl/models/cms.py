"""Continuum Memory System (paper §7): a chain of MLP levels, each updated at its own frequency.

Each level is a pre-norm residual MLP tagged with a `LevelSpec`. For `step` levels the optimizer
(`nlcl.optim.MultiFrequencyOptimizer`) steps the level once per period with the summed gradients
of the period (Eq. 71). Variants:
- sequential (default, Eq. 73): x <- x + MLP_l(norm_l(x)) for l = 1..k, fastest level first;
- independent (head-wise, Eq. 74): y = x + sum_l w_l MLP_l(norm_l(x)), learnable weights w;
- nested (Eq. 72, step unit): level l's weights are θ_l = θ0_l + Δ_l where the initial state θ0_l
  belongs to the next slower level and the offset Δ_l to level l itself; Δ_l returns to zero each
  time the slower level steps (`reset_nested`), so the slower level meta-learns where the faster
  one restarts.
Levels can be initialised from a pretrained model's MLP blocks (ad-hoc level stacking, §7.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nlcl.levels import LevelSpec, tag
from nlcl.models.transformer import RMSNorm

VARIANTS = ("sequential", "independent", "nested")


@dataclass
class CMSConfig:
    d_model: int = 128
    periods: list[int] = field(default_factory=lambda: [1, 8, 64])  # fastest first
    unit: str = "step"
    hidden: int | None = None        # per-level MLP width; default 4*d/len(periods), rounded to 32
    variant: str = "sequential"
    lr_scales: list[float] | None = None

    def __post_init__(self):
        self.periods = [int(p) for p in self.periods]
        if not self.periods:
            raise ValueError("model.cms.periods: needs at least one level")
        if self.variant not in VARIANTS:
            raise ValueError(f"model.cms.variant: '{self.variant}' is not one of {VARIANTS}")
        if self.lr_scales is not None and len(self.lr_scales) != len(self.periods):
            raise ValueError("model.cms.lr_scales: needs one value per level in model.cms.periods")
        if self.hidden is None:
            self.hidden = max(32, 32 * round(4 * self.d_model / len(self.periods) / 32))


class MLP(nn.Module):
    """Linear -> GELU -> Linear with biases: the shape of BERT/MiniLM MLP blocks, so they can be loaded."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class CMSLevel(nn.Module):
    def __init__(self, d: int, hidden: int, spec: LevelSpec):
        super().__init__()
        self.norm, self.mlp = RMSNorm(d), MLP(d, hidden)
        tag(self, spec)

    def forward(self, x):
        return self.mlp(self.norm(x))


class NestedOffset(nn.Module):
    """Δ for a nested level: zero at start and after every reset; tagged with the fast level."""

    def __init__(self, like: nn.Module, spec: LevelSpec):
        super().__init__()
        self.deltas = nn.ParameterList(nn.Parameter(torch.zeros_like(p)) for p in like.parameters())
        tag(self, spec)

    @torch.no_grad()
    def reset(self):
        for d in self.deltas:
            d.zero_()


class ContinuumMemory(nn.Module):
    def __init__(self, cfg: CMSConfig):
        super().__init__()
        self.cfg = cfg
        scales = cfg.lr_scales or [1.0] * len(cfg.periods)
        self.specs = [LevelSpec(f"cms{i}_p{p}", p, cfg.unit, s) for i, (p, s) in enumerate(zip(cfg.periods, scales))]
        self.levels = nn.ModuleList(CMSLevel(cfg.d_model, cfg.hidden, spec) for spec in self.specs)
        if cfg.variant == "independent":
            self.mix = nn.Parameter(torch.full((len(self.levels),), 1.0 / len(self.levels)))
        self.is_nested_cms = cfg.variant == "nested"
        if cfg.variant == "nested":
            # level l's initial state lives in level l+1 (slower); its offset in level l
            for i in range(len(self.levels) - 1):
                tag(self.levels[i], self.specs[i + 1])
            self.offsets = nn.ModuleList(NestedOffset(self.levels[i], self.specs[i])
                                         for i in range(len(self.levels) - 1))

    def _level_out(self, i: int, x: torch.Tensor) -> torch.Tensor:
        level = self.levels[i]
        if self.cfg.variant != "nested" or i == len(self.levels) - 1:
            return level(x)
        names = [n for n, _ in level.named_parameters()]
        params = {n: p + d for n, p, d in zip(names, level.parameters(), self.offsets[i].deltas)}
        return torch.func.functional_call(level, params, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.variant == "independent":
            return x + sum(w * self._level_out(i, x) for i, w in enumerate(self.mix))
        for i in range(len(self.levels)):
            x = x + self._level_out(i, x)
        return x

    @torch.no_grad()
    def reset_nested(self, optimizer_step: int) -> None:
        """Zero each nested offset whose slower parent level steps at `optimizer_step` (1-based)."""
        if self.cfg.variant != "nested":
            return
        for i, off in enumerate(self.offsets):
            if optimizer_step % self.specs[i + 1].period == 0:
                off.reset()

    @torch.no_grad()
    def load_pretrained_mlps(self, mlps: list[dict[str, torch.Tensor]]) -> None:
        """Ad-hoc level stacking: level l starts as pretrained MLP block l.

        Each dict holds `up.weight`, `up.bias`, `down.weight`, `down.bias` of one pretrained block
        (e.g. BERT's intermediate.dense / output.dense).
        """
        if len(mlps) < len(self.levels):
            raise ValueError(f"ad-hoc level stacking needs {len(self.levels)} pretrained MLP blocks, got {len(mlps)}")
        for level, block in zip(self.levels, mlps):
            for name, tensor in block.items():
                target = level.mlp.get_parameter(name)
                if target.shape != tensor.shape:
                    raise ValueError(f"pretrained MLP '{name}' has shape {tuple(tensor.shape)}, "
                                     f"level expects {tuple(target.shape)} (set model.cms.hidden to match)")
                target.copy_(tensor)
