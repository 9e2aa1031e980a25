"""LSTM baseline (the recurrent reference of the paper's formal-language table).

Token embedding -> stacked nn.LSTM (cuDNN on GPU) -> RMSNorm; hidden states [B, T, d] for the
heads in `heads.py`. Sequential in time, so it is the non-parallel baseline, not a fast one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nlcl.models.transformer import RMSNorm


@dataclass
class LSTMConfig:
    vocab_size: int = 260
    d_model: int = 128
    n_layers: int = 2
    dropout: float = 0.0

    def __post_init__(self):
        if self.d_model < 1 or self.n_layers < 1:
            raise ValueError(f"model.d_model and model.n_layers must be >= 1, got {self.d_model}, {self.n_layers}")


class LSTMBackbone(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg, self.d_model = cfg, cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, num_layers=cfg.n_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.norm = RMSNorm(cfg.d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(ids))
        return self.norm(h)
