"""Mechanism telemetry: what the self-modifying layers actually did during training.

Any module with `mechanism_stats()` / `reset_mechanism_stats()` (today: SelfModifyingTitans) is
found by walking the model, so runners and reports need no knowledge of the layer. Stats are summed
on the device during training forwards and read (one host sync) only here, at log points and at
the end of each experience.
"""
from __future__ import annotations

from torch import Tensor, nn


def mechanism_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name or "model": m for name, m in model.named_modules() if callable(getattr(m, "mechanism_stats", None))}


def collect_mechanism_stats(model: nn.Module, reset: bool = True) -> dict[str, dict[str, float]]:
    """{layer name: {stat: value}} since the last reset; layers that saw no training forward are left out."""
    out = {}
    for name, layer in mechanism_layers(model).items():
        stats = layer.mechanism_stats()
        if stats:
            out[name] = stats
        if reset:
            layer.reset_mechanism_stats()
    return out


def longest_sequence(x: Tensor, pad_id: int) -> int:
    """Length of the longest right-padded token sequence in x [N, L] (0 for an empty tensor)."""
    if x.numel() == 0:
        return 0
    real = (x != pad_id).any(0).nonzero()
    return int(real.max()) + 1 if len(real) else 0


def chunking_warnings(model: nn.Module, longest: int) -> list[str]:
    """Messages for every self-modifying layer whose chunks are too long for the data: when the
    longest training sequence fits in one chunk, that chunk's writes are never read and the layer
    runs as a static-projection recurrence."""
    messages = []
    for name, layer in mechanism_layers(model).items():
        cfg = getattr(layer, "cfg", None)
        if cfg is None or not hasattr(cfg, "chunk_size_other"):
            continue
        if longest <= cfg.chunk_size_other:
            messages.append(
                f"{name}: model.memory.chunk_size_other={cfg.chunk_size_other} >= the longest training sequence "
                f"({longest} tokens): the k/v/eta/alpha memories never write, so self-modification cannot act. "
                f"Use model.memory.chunk_size_other < {longest}.")
        elif longest <= cfg.chunk_size_memory:
            messages.append(
                f"{name}: model.memory.chunk_size_memory={cfg.chunk_size_memory} >= the longest training sequence "
                f"({longest} tokens): the main memory's gradient is always taken at its initial state.")
    return messages
