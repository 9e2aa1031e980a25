"""Build a model by name or by `_target_`. The runner only ever calls `build_model`.

The contract for a user's model (docs/plugins.md):
- a backbone maps token ids [B, T] (LongTensor, right-padded with pad_id) to hidden states
  [B, T, d_model] and has an int attribute `d_model`; it must be causal (position t sees tokens
  <= t), because the classifier reads the state of the last real token and the LM head predicts
  the next token. nlcl adds the head (SequenceClassifier or CausalLM).
- a classifier maps a batch of inputs (token ids, or images [B, ...]) to logits [B, num_classes].
Builders receive, among `vocab_size`, `num_classes`, `pad_id`, `in_dim`, `input_kind`, `task`, the
ones their signature names (all of them with **kwargs), plus the config's other fields.
"""
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
    """`model.name=<name>` builds `builder(vocab_size=, [pad_id=,] **fields)`; call it in a `plugins` module."""
    BACKBONES[name] = builder


# name -> builder(num_classes=, pad_id=, **model_kwargs) returning a whole classifier
CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {}


def register_classifier(name: str, builder: Callable[..., nn.Module]) -> None:
    """`model.name=<name>` builds a whole classifier: `builder(num_classes=, pad_id=, **fields)` -> logits."""
    CLASSIFIERS[name] = builder


def _custom_model(target: str, kwargs: dict, context: dict) -> nn.Module:
    """`model._target_`: a builder taking `num_classes` is a whole classifier, any other a backbone."""
    from nlcl.plugins import PluginError, call_target, resolve

    fn = resolve(target, "model._target_")
    classifier = "num_classes" in _named_params(fn)
    if classifier and context["task"] != "classify":
        raise PluginError(f"model._target_: {target} takes num_classes (a classifier); a language-modelling "
                          "stream needs a backbone (token ids -> hidden states)")
    if not classifier and context["input_kind"] != "tokens":
        raise PluginError(f"model._target_: {target} is a backbone (no num_classes parameter) but the stream "
                          f"holds {context['input_kind']} inputs; give it a num_classes parameter and return logits")
    model = call_target({"_target_": target, **kwargs}, "model", context)
    if not isinstance(model, nn.Module):
        raise PluginError(f"model._target_: {target} returned {type(model).__name__}, not a torch.nn.Module")
    if classifier:
        return model
    if not isinstance(getattr(model, "d_model", None), int):
        raise PluginError(f"model._target_: the backbone from {target} needs an int attribute d_model (its "
                          "hidden size), so that nlcl can put a head on it")
    return _head(model, context)


def _named_params(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _head(backbone: nn.Module, context: dict) -> nn.Module:
    if context["task"] == "lm":
        from nlcl.models.incontext import InContextLM, has_token_levels

        # token-unit CMS levels learn in context: both passes run inside the model's forward
        return (InContextLM if has_token_levels(backbone) else CausalLM)(backbone, context["vocab_size"])
    return SequenceClassifier(backbone, context["num_classes"], pad_id=context["pad_id"])


def model_names() -> list[str]:
    return sorted([*BACKBONES, *CLASSIFIERS, "mlp"])


def build_model(name: str | None, *, input_kind: str, num_classes: int | None = None, vocab_size: int | None = None,
                in_dim: int | None = None, pad_id: int = 0, task: str = "classify", _target_: str | None = None,
                **kwargs) -> nn.Module:
    """`task="classify"` gives logits [B, num_classes]; `task="lm"` gives next-token logits."""
    if _target_ is not None:
        context = {"input_kind": input_kind, "num_classes": num_classes, "vocab_size": vocab_size, "in_dim": in_dim,
                   "pad_id": pad_id, "task": task}
        return _custom_model(_target_, kwargs, context)
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
    builder = BACKBONES[name]
    asks_pad = "pad_id" in _named_params(builder) and "pad_id" not in kwargs  # the pad id, for models that ask
    try:
        backbone = builder(vocab_size=vocab_size, **({"pad_id": pad_id} if asks_pad else {}), **kwargs)
    except TypeError as e:  # an unknown field in the model config
        raise ValueError(f"model '{name}': {e}") from None
    return _head(backbone, {"task": task, "vocab_size": vocab_size, "num_classes": num_classes, "pad_id": pad_id})


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
