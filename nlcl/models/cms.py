"""Continuum Memory System (paper §7): a chain of MLP levels, each updated at its own frequency.

Each level is a pre-norm residual MLP tagged with a `LevelSpec`. For `step` levels the optimizer
(`nlcl.optim.MultiFrequencyOptimizer`) steps the level once per period with the summed gradients
of the period (Eq. 71). Variants:
- sequential (default, Eq. 73): x <- x + MLP_l(norm_l(x)) for l = 1..k, fastest level first;
- independent (head-wise, Eq. 74): y = x + sum_l w_l MLP_l(norm_l(x)), learnable weights w;
- nested (Eq. 72, step unit): level l's weights are θ_l = θ0_l + Δ_l where the initial state θ0_l
  belongs to the next slower level and the offset Δ_l to level l itself; Δ_l returns to zero each
  time the slower level steps (`on_level_step`, which the optimizer calls), so the slower level meta-learns where the faster
  one restarts.
Levels can be initialised from a pretrained model's MLP blocks (ad-hoc level stacking, §7.3).

Token-unit levels (`unit: token`, or per level through `units`) are in-context fast weights: every
sequence starts from the level's meta-learned initial state (its nn.Parameters) and, every
`period` tokens, the MLP's four tensors take one gradient step on the chunk's summed error terms,
all taken at the chunk-start weights (Eq. 71). The error terms come from teach signals that
`nlcl.models.incontext` computes in a first pass and hands to the level (`CMSLevel.teach`);
without teach signals a token level is an ordinary MLP at its initial state. The chunk math is the
pure function `fast_mlp_chunked`; `fast_mlp_reference` is its token-by-token autograd reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nlcl.levels import UNITS, LevelSpec, tag
from nlcl.models.transformer import RMSNorm

VARIANTS = ("sequential", "independent", "nested")
TEACH_SIGNALS = ("exact", "frozen_mixers")


@dataclass
class CMSConfig:
    d_model: int = 128
    periods: list[int] = field(default_factory=lambda: [1, 8, 64])  # fastest first
    unit: str = "step"
    hidden: int | None = None        # per-level MLP width; default 4*d/len(periods), rounded to 32
    variant: str = "sequential"
    lr_scales: list[float] | None = None
    units: list[str] | None = None   # per-level unit ("step" | "token"); overrides `unit`
    # token levels' in-context step size (one value, or one per level; ignored by step levels).
    # The teach signals are per-token loss gradients (a sum, not a batch mean), so this is the step
    # per token of error, independent of the batch size.
    inner_lr: float | list[float] = 0.01
    differentiable_writes: bool = True  # False: stop-grad writes (meta-init learns through reads only)
    # token levels' teach signals (nlcl.models.incontext): "exact" (each chunk's own loss through the
    # whole model, one backward per chunk) | "frozen_mixers" (one backward; exact for the last block only)
    teach_signals: str = "exact"

    def __post_init__(self):
        self.periods = [int(p) for p in self.periods]
        if not self.periods:
            raise ValueError("model.cms.periods: needs at least one level")
        if self.variant not in VARIANTS:
            raise ValueError(f"model.cms.variant: '{self.variant}' is not one of {VARIANTS}")
        if self.lr_scales is not None and len(self.lr_scales) != len(self.periods):
            raise ValueError("model.cms.lr_scales: needs one value per level in model.cms.periods")
        self.units = [str(u) for u in self.units] if self.units is not None else [self.unit] * len(self.periods)
        if len(self.units) != len(self.periods):
            raise ValueError("model.cms.units: needs one value per level in model.cms.periods")
        bad = [u for u in self.units if u not in UNITS]
        if bad:
            raise ValueError(f"model.cms.units: {bad} not in {UNITS}")
        if isinstance(self.inner_lr, (int, float)):
            self.inner_lr = [float(self.inner_lr)] * len(self.periods)
        self.inner_lr = [float(v) for v in self.inner_lr]
        if len(self.inner_lr) != len(self.periods):
            raise ValueError("model.cms.inner_lr: needs one value, or one per level in model.cms.periods")
        if self.variant == "nested" and "token" in self.units:
            raise ValueError("model.cms: the nested variant is defined for step-unit levels only")
        if self.teach_signals not in TEACH_SIGNALS:
            raise ValueError(f"model.cms.teach_signals: '{self.teach_signals}' is not one of {TEACH_SIGNALS}")
        if self.hidden is None:
            self.hidden = max(32, 32 * round(4 * self.d_model / len(self.periods) / 32))


class MLP(nn.Module):
    """Linear -> GELU -> Linear with biases: the shape of BERT/MiniLM MLP blocks, so they can be loaded."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d gelu(z) / dz for the exact (erf) GELU: Phi(z) + z phi(z)."""
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [B, C, i] through weights shared by the batch (w [o, i]) or one per sequence (w [B, o, i])."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def fast_mlp_chunked(u: torch.Tensor, params: tuple[torch.Tensor, ...], teach: torch.Tensor,
                     chunk: int, lr: float, differentiable: bool = True, return_state: bool = False):
    """In-context MLP `down(gelu(up(u)))` whose weights step every `chunk` tokens (Eq. 71).

    u, teach [B, T, d]; params = (up.weight [h, d], up.bias [h], down.weight [d, h], down.bias [d]),
    the initial state shared by every sequence. Tokens of chunk c read W_c; after the chunk,
    W_{c+1} = W_c - lr * sum_{t in c} grad_W <out_t(W_c), teach_t>: per token the gradients are
    rank-1 outer products, so a chunk's sum is one batched matmul per tensor. The writes stay in
    the autograd graph (the outer gradient reaches the initial state through them) unless
    `differentiable=False` (stop-grad writes: the initial state then learns only through the reads).
    The teach signals are constants. The last chunk (full or partial) writes nothing: no token
    of this sequence would read it, and nothing carries over to the next sequence.
    `return_state=True` also returns the weights the last chunk read.
    """
    w1, b1, w2, b2 = params
    if lr == 0.0 or chunk >= u.shape[1]:  # no token ever reads a written state
        out = F.linear(F.gelu(F.linear(u, w1, b1)), w2, b2)
        return (out, params) if return_state else out
    u_chunks, teach_chunks = u.split(chunk, 1), teach.split(chunk, 1)
    outs = []
    for c, (u_c, d_c) in enumerate(zip(u_chunks, teach_chunks)):
        z = _linear(u_c, w1, b1)                                  # [B, C, h]
        a = F.gelu(z)
        outs.append(_linear(a, w2, b2))                           # [B, C, d]
        if c == len(u_chunks) - 1:
            break
        g_z = (d_c @ w2) * gelu_grad(z)                           # d<out, teach>/dz at W_c
        steps = (g_z.transpose(1, 2) @ u_c, g_z.sum(1), d_c.transpose(1, 2) @ a, d_c.sum(1))
        if not differentiable:
            steps = tuple(s.detach() for s in steps)
        w1, b1, w2, b2 = (torch.add(w, s, alpha=-lr) for w, s in zip((w1, b1, w2, b2), steps))
    out = torch.cat(outs, 1)
    return (out, (w1, b1, w2, b2)) if return_state else out


@torch.no_grad()
def write_norm(state: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over sequences of || fast weights read last - initial state || (all four tensors)."""
    sq = torch.zeros((), device=params[0].device)
    for s, p in zip(state, params):
        if s.dim() > p.dim():  # per-sequence weights were written
            sq = sq + (s - p).float().pow(2).flatten(1).sum(1)
    return sq.sqrt().mean()


def fast_mlp_reference(u: torch.Tensor, params: tuple[torch.Tensor, ...], teach: torch.Tensor,
                       chunk: int, lr: float) -> torch.Tensor:
    """Token-by-token reference of `fast_mlp_chunked` for the tests: one weight copy per sequence,
    each token's gradient by autograd at the chunk-start weights (create_graph, so it can be
    differentiated too), applied when the chunk ends."""
    B, T, _ = u.shape
    rows = []
    for b in range(B):
        weights = list(params)
        pending = [torch.zeros_like(w) for w in weights]
        out_b = []
        for t in range(T):
            with torch.enable_grad():
                w = [p if p.requires_grad else p.detach().requires_grad_() for p in weights]
                out_t = F.linear(F.gelu(F.linear(u[b, t], w[0], w[1])), w[2], w[3])
                grads = torch.autograd.grad((out_t * teach[b, t]).sum(), w, create_graph=True)
            out_b.append(out_t)
            pending = [s + g for s, g in zip(pending, grads)]
            if (t + 1) % chunk == 0:
                weights = [p - lr * g for p, g in zip(weights, pending)]
                pending = [torch.zeros_like(p) for p in weights]
        rows.append(torch.stack(out_b))
    return torch.stack(rows)


class CMSLevel(nn.Module):
    """Pre-norm MLP of one level. A token-unit level runs in-context when `teach` holds teach
    signals [B, T, d] for the current batch (set by `nlcl.models.incontext`); when `record` is on it
    keeps its output as `recorded`, so a first pass can differentiate the loss by it.
    The norm's gain is a slow weight only: the fast weights are the MLP's four tensors."""

    def __init__(self, d: int, hidden: int, spec: LevelSpec, inner_lr: float = 0.0,
                 differentiable_writes: bool = True):
        super().__init__()
        self.norm, self.mlp = RMSNorm(d), MLP(d, hidden)
        self.spec, self.inner_lr = spec, inner_lr  # own spec: the nested variant retags nl_level
        self.differentiable_writes = differentiable_writes
        self.teach: torch.Tensor | None = None
        self.last_write_norm: torch.Tensor | None = None  # telemetry of the latest in-context forward
        self.record = False
        self.recorded: torch.Tensor | None = None
        self.exact_teach = True  # read by nlcl.models.incontext.teach_signals
        tag(self, spec)

    @property
    def is_token_level(self) -> bool:
        return self.spec.unit == "token"

    def fast_params(self) -> tuple[torch.Tensor, ...]:
        m = self.mlp
        return m.up.weight, m.up.bias, m.down.weight, m.down.bias

    def forward(self, x):
        if self.teach is not None:
            if self.teach.shape != x.shape:
                raise ValueError(f"{self.spec.name}: teach signals {tuple(self.teach.shape)} do not match "
                                 f"the level input {tuple(x.shape)}")
            params = self.fast_params()
            out, state = fast_mlp_chunked(self.norm(x), params, self.teach.to(x.dtype), self.spec.period,
                                          self.inner_lr, self.differentiable_writes, return_state=True)
            self.last_write_norm = write_norm(state, params)
            return out
        out = self.mlp(self.norm(x))
        if self.record:
            if self.recorded is not None:
                raise RuntimeError(f"{self.spec.name}: called twice in one recorded pass")
            if not out.requires_grad:  # frozen and fed by constants: still a point to differentiate at
                out = out.detach().requires_grad_()
            self.recorded = out
        return out


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
        self.specs = [LevelSpec(f"cms{i}_{'t' if u == 'token' else 'p'}{p}", p, u, s)
                      for i, (p, u, s) in enumerate(zip(cfg.periods, cfg.units, scales))]
        self.levels = nn.ModuleList(CMSLevel(cfg.d_model, cfg.hidden, spec, lr, cfg.differentiable_writes)
                                    for spec, lr in zip(self.specs, cfg.inner_lr))
        for level in self.levels:
            level.exact_teach = cfg.teach_signals == "exact"
        if cfg.variant == "independent":
            self.mix = nn.Parameter(torch.full((len(self.levels),), 1.0 / len(self.levels)))
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
    def on_level_step(self, stepped: list[str], step_count: int) -> None:
        """Nested variant: zero each offset whose slower parent level is among the levels that just
        applied an update (`stepped`, announced by the multi-frequency optimizer after every step).
        The faster level then restarts from the initial state its parent just meta-learned."""
        if self.cfg.variant != "nested":
            return
        for i, off in enumerate(self.offsets):
            if self.specs[i + 1].name in stepped:
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
