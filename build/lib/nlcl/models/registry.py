"""Build a model by name. The runner only ever calls `build_model`; new families register here."""
from __future__ import annotations

from typing import Callable

from torch import nn

from nlcl.models.heads import CausalLM, MLPClassifier, SequenceClassifier
from nlcl.models.lstm import LSTMBackbone, LSTMConfig
from nlcl.models.transformer import TransformerBackbone, TransformerConfig

# name -> builder(**model_kwargs) returning a backbone [B, T] -> [B, T, d]
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "transformer": lambda **kw: TransformerBackbone(TransformerConfig(**kw)),
    "lstm": lambda **kw: LSTMBackbone(LSTMConfig(**kw)),
}


def register_backbone(name: str, builder: Callable[..., nn.Module]) -> None:
    BACKBONES[name] = builder


# name -> builder(num_classes=, pad_id=, **model_kwargs) returning a whole classifier
CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {}


def model_names() -> list[str]:
    return sorted([*BACKBONES, *CLASSIFIERS, "mlp"])


def build_model(name: str, *, input_kind: str, num_classes: int | None = None, vocab_size: int | None = None,
                in_dim: int | None = None, pad_id: int = 0, task: str = "classify", **kwargs) -> nn.Module:
    """`task="classify"` gives logits [B, num_classes]; `task="lm"` gives next-token logits."""
    if name == "mlp":
        if input_kind != "image":
            raise ValueError(f"model.name=mlp needs an image stream, got input_kind '{input_kind}'")
        return MLPClassifier(in_dim, num_classes, **kwargs)
    if name in CLASSIFIERS:
        if task != "classify":
            raise ValueError(f"model.name={name} is a classifier; it cannot serve a language-modelling stream")
        try:
            return CLASSIFIERS[name](num_classes=num_classes, pad_id=pad_id, **kwargs)
        except TypeError as e:
            raise ValueError(f"model '{name}': {e}") from None
    if name not in BACKBONES:
        raise ValueError(f"model.name: unknown model '{name}'; allowed: {model_names()}")
    if input_kind != "tokens":
        raise ValueError(f"model.name={name} needs a token stream, got input_kind '{input_kind}'")
    try:
        backbone = BACKBONES[name](vocab_size=vocab_size, **kwargs)
    except TypeError as e:  # an unknown field in the model config
        raise ValueError(f"model '{name}': {e}") from None
    if task == "lm":
        from nlcl.models.incontext import InContextLM, has_token_levels

        # token-unit CMS levels learn in context: both passes run inside the model's forward
        return (InContextLM if has_token_levels(backbone) else CausalLM)(backbone, vocab_size)
    return SequenceClassifier(backbone, num_classes, pad_id=pad_id)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _register_memory_families() -> None:
    from nlcl.models.hope import hope_ablation, hope_backbone

    for family in ("hope", "hope_attention", "titans"):
        register_backbone(family, hope_backbone(family))
    register_backbone("hope_no_cms", hope_ablation(use_cms=False))
    register_backbone("hope_no_dgd", hope_ablation(memory={"update_rule": "gd"}))

    def minilm(**kw):
        from nlcl.models.minilm import MiniLMClassifier

        return MiniLMClassifier(**kw)

    CLASSIFIERS["minilm"] = minilm


_register_memory_families()
