"""Transformer++ (Llama-style): RMSNorm, rotary position embeddings, SwiGLU, PyTorch SDPA.

Read top to bottom: RMSNorm -> rotary -> Attention -> SwiGLU -> Block -> TransformerBackbone.
The backbone maps token ids [B, T] to hidden states [B, T, d]; heads live in `heads.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    vocab_size: int = 260
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: int | None = None  # SwiGLU width; default 8/3 d rounded to 32
    max_len: int = 4096
    rope_base: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.mlp_hidden is None:
            self.mlp_hidden = 32 * ((8 * self.d_model // 3 + 31) // 32)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(T: int, dh: int, base: float, device, dtype):
    inv_freq = 1.0 / (base ** (torch.arange(0, dh, 2, device=device, dtype=torch.float32) / dh))
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    # x [B, H, T, dh]: rotate pairs (even, odd) halves in the "split half" convention
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.dh = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rope_base = cfg.rope_base
        self.dropout = cfg.dropout
        self._rope_cache: tuple | None = None

    def rotary(self, T: int, device, dtype):
        """Tables for the longest length seen so far, sliced: no recomputation per step."""
        c = self._rope_cache
        if c is None or c[0].shape[0] < T or c[0].device != device or c[0].dtype != dtype:
            c = self._rope_cache = rotary_tables(max(T, 64), self.dh, self.rope_base, device, dtype)
        return c[0][:T], c[1][:T]

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.dh).permute(2, 0, 3, 1, 4)
        cos, sin = self.rotary(T, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), CausalSelfAttention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model), SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlockStack(nn.Module):
    """Token ids -> embedding -> residual blocks -> final RMSNorm; every backbone family is one."""

    def __init__(self, cfg, make_block, embed_std: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if embed_std is not None:
            nn.init.normal_(self.embed.weight, std=embed_std)
        self.blocks = nn.ModuleList(make_block() for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TransformerBackbone(BlockStack):
    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg, lambda: TransformerBlock(cfg))
        self.apply(init_weights)


def init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
