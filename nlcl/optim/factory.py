"""Build the outer optimizer by name; always level-aware (a period-1 level is the plain optimizer)."""
from __future__ import annotations

import torch
from torch import nn

from nlcl.optim.delta import DGDOuter, DMGD, DeltaMomentum
from nlcl.optim.m3 import M3
from nlcl.optim.multifrequency import MultiFrequencyOptimizer
from nlcl.optim.muon import Muon, muon_exclusions, split_muon_groups

OPTIMIZERS = ("adamw", "sgd", "muon", "m3", "m3_ema", "delta_momentum", "dmgd", "dgd")
# steps that are not linear in the gradient's size (Adam-style normalisation, orthogonalisation): a slow
# level steps on its period's mean gradient at its rate times the period ("gradient" accumulation)
NORMALIZING = ("adamw", "muon", "m3", "m3_ema")


def build_optimizer(model: nn.Module, name: str | None, lr: float, weight_decay: float = 0.0,
                    track_update_norm: bool = True, level_accumulation: str = "gradient",
                    _target_: str | None = None, **kw) -> torch.optim.Optimizer:
    """A MultiFrequencyOptimizer whose levels each get optimizer `name`; `kw` goes to that optimizer.

    level_accumulation: how a slow level collects its period ("gradient", "gradient_literal",
    "update"; see `nlcl.optim.multifrequency`). Every module of `model` with an `on_level_step`
    method is subscribed to the optimizer's level-step announcements (the nested CMS resets).

    For muon / m3 / m3_ema, `lr` is the orthogonalised path's rate and `adamw_lr` (in kw) the rate of
    the AdamW half (biases, norms, embeddings, heads); a level's lr_scale scales both.
    """
    normalizes = name in NORMALIZING
    if _target_ is None and name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS} (or give optim._target_), got '{name}'")

    if _target_ is not None:  # any torch.optim.Optimizer class: cls(param_groups, lr=, weight_decay=, **kw)
        from nlcl.plugins import resolve

        target_cls = resolve(_target_, "optim._target_")
        # say normalizes_gradient=true for Adam-like steps (see NORMALIZING): slow levels then step on means
        normalizes = bool(kw.pop("normalizes_gradient", False))

        def make(groups):
            return target_cls(groups, lr=lr, weight_decay=weight_decay, **kw)
    elif name in ("muon", "m3", "m3_ema"):
        excluded = muon_exclusions(model)
        adamw_lr = kw.pop("adamw_lr", 3e-4)
        cls = Muon if name == "muon" else M3
        if name == "m3_ema":
            kw["variant"] = "ema"

        def make(groups):
            return cls(split_muon_groups(groups, excluded, adamw_lr / lr), lr=lr, adamw_lr=adamw_lr,
                       weight_decay=weight_decay, **kw)
    elif name == "dgd":
        def make(groups):
            return DGDOuter(groups, lr=lr, weight_decay=weight_decay, model=model, **kw)
    else:
        cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "delta_momentum": DeltaMomentum,
               "dmgd": DMGD}[name]
        if name in ("adamw", "sgd"):
            kw.setdefault("foreach", True)  # multi-tensor kernels; torch picks the slow per-tensor path on CPU

        def make(groups):
            return cls(groups, lr=lr, weight_decay=weight_decay, **kw)

    opt = MultiFrequencyOptimizer(model, make, lr, track_update_norm=track_update_norm,
                                  accumulation=level_accumulation, normalizes_gradient=normalizes)
    for module in model.modules():
        if callable(getattr(module, "on_level_step", None)):
            opt.subscribe(module.on_level_step)
    return opt
