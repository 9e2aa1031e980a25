"""Muon: momentum whose update is orthogonalised by a Newton–Schulz iteration (paper Eqs. 42–44).

Only 2-D weight matrices take the orthogonalised path. Everything else (biases, norms, embeddings,
output heads: any group with `use_muon=False`) is updated by AdamW inside the same optimizer, as in
Keller Jordan's Muon. `HybridOptimizer` holds that routing and the AdamW half, so M3 shares it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic: steep at 0, singular values land near 1
HEAD_NAMES = ("head", "lm_head", "classifier", "unembed", "unembedding")


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalise G (the polar factor U V^T of G = U S V^T), batched over leading dims.

    Each step X <- a X + b (X X^T) X + c (X X^T)^2 X applies the odd polynomial a s + b s^3 + c s^5
    to every singular value s. After scaling G to Frobenius norm 1 (so s <= 1), the quintic
    coefficients push all singular values into a band around 1 in a few steps; they do not converge
    exactly to 1, which Muon does not need.
    """
    a, b, c = coefficients
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is the smaller one
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def adamw_update(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    """One in-place AdamW step (decoupled weight decay, bias-corrected moments), as torch.optim.AdamW."""
    beta1, beta2 = betas
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


def muon_exclusions(model: nn.Module) -> set[int]:
    """ids of parameters that must not take the orthogonalised path even when 2-D: embeddings,
    output heads (modules named like HEAD_NAMES) and any module with `muon_exclude = True`."""
    excluded = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) or leaf in HEAD_NAMES or getattr(module, "muon_exclude", False):
            excluded.update(id(p) for p in module.parameters())
    return excluded


def split_muon_groups(groups: list[dict], excluded: set[int] = frozenset(),
                      adamw_lr_ratio: float | None = None) -> list[dict]:
    """Split each param group into an orthogonalised part (2-D, not excluded) and an AdamW part.

    adamw_lr_ratio: if given, the AdamW part gets `lr * adamw_lr_ratio` from the group's lr, so a
    level's lr_scale (and an LR scheduler) moves both halves together.
    """
    out = []
    for group in groups:
        params = list(group["params"])
        ortho = [p for p in params if p.ndim == 2 and id(p) not in excluded]
        rest = [p for p in params if not (p.ndim == 2 and id(p) not in excluded)]
        options = {k: v for k, v in group.items() if k != "params"}
        if ortho:
            out.append({**options, "params": ortho, "use_muon": True})
        if rest:
            extra = {}
            if adamw_lr_ratio is not None and "lr" in group:
                extra["lr"] = group["lr"] * adamw_lr_ratio
            out.append({**options, **extra, "params": rest, "use_muon": False})
    return out


def muon_param_groups(model: nn.Module) -> list[dict]:
    """Groups for Muon/M3: 2-D weights that are not embeddings or heads orthogonalised, the rest AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    return split_muon_groups([{"params": params}], muon_exclusions(model))


class HybridOptimizer(torch.optim.Optimizer):
    """Base for optimizers with an orthogonalised path (groups with `use_muon=True`, 2-D only) and an
    AdamW fallback (`use_muon=False`). Groups without `use_muon` are split by dimensionality; groups
    without `lr` get `lr` (orthogonalised) or `adamw_lr` (fallback)."""

    def __init__(self, params, defaults: dict, adamw_lr: float):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        routed = []
        for group in groups:
            if "use_muon" not in group:
                routed.extend(split_muon_groups([group]))
                continue
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError(f"{type(self).__name__}: a group with use_muon=True holds a parameter "
                                 "that is not 2-D; route it to AdamW (use_muon=False)")
            routed.append(dict(group))
        for group in routed:
            group.setdefault("lr", defaults["lr"] if group["use_muon"] else adamw_lr)
        super().__init__(routed, {**defaults, "adamw_lr": adamw_lr})

    def _adamw_step(self, group: dict):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                         group["adamw_betas"], group["adamw_eps"], group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._orthogonal_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _orthogonal_step(self, group: dict):
        raise NotImplementedError


def _ns_dtype(group: dict, p: torch.Tensor) -> torch.dtype:
    # bf16 on accelerators (fast, and Newton–Schulz tolerates it); float32 on CPU
    return group["ns_dtype"] or (torch.bfloat16 if p.is_cuda else torch.float32)


class Muon(HybridOptimizer):
    """Muon: m <- mu m + g; update = NS(g + mu m) (Nesterov) or NS(m); W <- W - lr * scale * update.

    scale = sqrt(max(1, rows / cols)) keeps the per-entry size of the update comparable across
    shapes (Keller Jordan's choice). Weight decay is decoupled and shared with the AdamW half.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_coefficients=NS_COEFFICIENTS, ns_dtype: torch.dtype | None = None,
                 weight_decay: float = 0.0, adamw_lr: float = 3e-4, adamw_betas=(0.9, 0.95),
                 adamw_eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=tuple(ns_coefficients), ns_dtype=ns_dtype,
                        weight_decay=weight_decay, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps)
        super().__init__(params, defaults, adamw_lr)

    def _orthogonal_step(self, group: dict):
        mu, lr = group["momentum"], group["lr"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)
            update = g.add(buf, alpha=mu) if group["nesterov"] else buf
            update = newton_schulz(update, group["ns_steps"], group["ns_coefficients"],
                                   dtype=_ns_dtype(group, p))
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * scale)
