"""Hope, Hope-Attention and Titans as backbones (token ids [B, T] -> hidden states [B, T, d]).

    Hope block           x <- x + SelfModifyingTitans(norm(x));  x <- CMS(x)
    Hope-Attention block x <- x + CausalAttention(norm(x));      x <- CMS(x)
    Titans block         x <- x + Titans(norm(x));               x <- x + SwiGLU(norm(x))

CMS replaces the block's MLP (paper §8.3: "self-modifying Titans followed by CMS"); its levels are
pre-norm residual MLPs, so the residual wiring matches a pre-norm Transformer block. Named
ablations: `hope_no_cms` (CMS replaced by one ordinary level updated every step) and `hope_no_dgd`
(plain GD instead of DGD inside self-modifying Titans).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import nn

from nlcl.models.cms import CMSConfig, ContinuumMemory
from nlcl.models.transformer import (BlockStack, CausalSelfAttention, RMSNorm, SwiGLU, TransformerConfig,
                                     init_weights)

FAMILIES = ("hope", "hope_attention", "titans")


@dataclass
class HopeConfig:
    family: str = "hope"
    vocab_size: int = 260
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: int | None = None               # Titans' SwiGLU width
    cms: dict = field(default_factory=dict)     # CMSConfig fields (periods, unit, hidden, variant)
    use_cms: bool = True
    memory: dict = field(default_factory=dict)  # SelfModifyingTitansConfig / TitansConfig fields

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model.family: '{self.family}' is not one of {FAMILIES}")


def _build_config(cls, given: dict, **defaults):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**{**{k: v for k, v in defaults.items() if k in names}, **given})


class HopeBlock(nn.Module):
    def __init__(self, cfg: HopeConfig):
        super().__init__()
        d = cfg.d_model
        self.norm = RMSNorm(d)
        if cfg.family == "hope":
            from nlcl.models.self_modifying_titans import SelfModifyingTitans, SelfModifyingTitansConfig

            self.mixer = SelfModifyingTitans(_build_config(SelfModifyingTitansConfig, cfg.memory,
                                                           d_model=d, n_heads=cfg.n_heads))
        elif cfg.family == "hope_attention":
            self.mixer = CausalSelfAttention(TransformerConfig(d_model=d, n_heads=cfg.n_heads))
        else:
            from nlcl.models.titans import Titans, TitansConfig

            self.mixer = Titans(_build_config(TitansConfig, cfg.memory, d_model=d, n_heads=cfg.n_heads))
        if cfg.family == "titans" or not cfg.use_cms:
            hidden = TransformerConfig(d_model=d, n_heads=cfg.n_heads, mlp_hidden=cfg.mlp_hidden).mlp_hidden
            self.mlp_norm, self.mlp, self.cms = RMSNorm(d), SwiGLU(d, hidden), None
        else:
            self.cms = ContinuumMemory(_build_config(CMSConfig, cfg.cms, d_model=d))

    def forward(self, x):
        x = x + self.mixer(self.norm(x))
        if self.cms is not None:
            return self.cms(x)
        return x + self.mlp(self.mlp_norm(x))


class HopeBackbone(BlockStack):
    def __init__(self, cfg: HopeConfig):
        super().__init__(cfg, lambda: HopeBlock(cfg), embed_std=0.02)
        for block in self.blocks:  # memories keep their own initialisation; CMS/MLP get the usual one
            for m in (block.cms, getattr(block, "mlp", None)):
                if m is not None:
                    m.apply(init_weights)


def hope_backbone(family: str):
    def build(**kw):
        return HopeBackbone(HopeConfig(family=family, **kw))
    return build


def hope_ablation(**overrides):
    def build(**kw):
        memory = {**overrides.get("memory", {}), **kw.pop("memory", {})}
        return HopeBackbone(HopeConfig(family="hope", memory=memory,
                                       **{**{k: v for k, v in overrides.items() if k != "memory"}, **kw}))
    return build
