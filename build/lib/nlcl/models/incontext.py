"""In-context (token-unit) CMS levels: the two-pass forward.

A token-unit CMS level (see `nlcl.models.cms`) starts every sequence from its meta-learned initial
state and takes one gradient step every `period` tokens on the task loss's error terms of the
chunk, all at the chunk-start weights (paper Eq. 71). The error terms are teach signals
(kmccleary's two-pass scheme, digest §8.1):

- pass 1: the whole model at its initial (meta) weights; the summed task loss is differentiated
  by every token level's output: delta_t = dl_t / d(level output at t), detached;
- pass 2: the same forward with in-context updates, each level's chunk step being
  grad_W sum_t <level_out_t(W_c), delta_t>; its output is what the outer loss is taken on, and the
  writes stay differentiable, so the outer optimizer trains the initial state through them.

Choices, stated once:
- **Causal teach signals.** In pass 1 the sequence mixers (attention, Titans, every module
  registered as a block's `mixer`) run as constants, so delta_t = dl_t / d o_t along token t's own
  residual stream. The literal dL/d o_t of a full backward would also carry the losses of later
  tokens back through attention (digest §10 pitfall 2), so a chunk's write would leak future targets
  into the next chunk's outputs. With the mixers frozen, outputs at position s depend on inputs
  <= s and targets < s only. delta is then the exact chain-rule gradient for the levels of the last
  block (and for any model with one mixer block); deeper levels lose the paths through the
  mixers of later blocks. `through_mixers=True` gives the literal, non-causal version (ablation).
- **Per-token sums.** The teach loss is a sum over tokens, not a batch mean, so a sequence's
  fast weights do not depend on what else is in the batch; `inner_lr` is a step per token of error.
- **Language models** learn in context from the context itself: `InContextLM(ids)` takes the
  next tokens of the input as targets (`next_token_targets`), at training and at evaluation alike.
  Chunk c's write uses the targets of chunk c's tokens, i.e. the inputs up to the first token of
  chunk c+1, and only tokens from chunk c+1 on read it: causal. The boundary token (the last
  input) has no target inside the context; it lies in the last chunk, whose write is never read,
  so it costs nothing. For a stream whose targets are the shifted inputs (LM domain streams) this
  is exactly the task loss; `targets=` teaches from explicit task targets instead (e.g. answers only).
- **Classifiers** have one loss, at the last real token: delta is non-zero only there, and the
  write of its chunk is read only by padding. Token levels then change nothing (the output equals
  the plain forward at the initial state); they are meant for LM and long-context streams.
- **Evaluation** (no_grad or inference_mode) runs the same two passes: pass 1 enables grad
  locally to get delta, pass 2 runs without a graph.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nlcl.models.cms import CMSLevel
from nlcl.models.heads import CausalLM

IGNORE = -100


def token_levels(model: nn.Module) -> list[CMSLevel]:
    return [m for m in model.modules() if isinstance(m, CMSLevel) and m.is_token_level]


def has_token_levels(model: nn.Module) -> bool:
    return any(isinstance(m, CMSLevel) and m.is_token_level for m in model.modules())


def sequence_mixers(model: nn.Module) -> list[nn.Module]:
    """The modules that mix information across positions: every block's `mixer` (HopeBlock)."""
    return [m.mixer for m in model.modules() if isinstance(getattr(m, "mixer", None), nn.Module)]


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """Targets from the context itself: ids shifted left; the boundary token gets none."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], 1)


def summed_task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over tokens (LM: logits [B, T, V], targets [B, T], -100 = none) or over
    examples (classifier: logits [B, K], targets [B])."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


@contextmanager
def _plain_calls(model: nn.Module):
    """Inside the two passes every InContextLM in `model` is plain (it would start two passes itself)."""
    lms = [(m, m._in_pass) for m in model.modules() if isinstance(m, InContextLM)]
    for m, _ in lms:
        m._in_pass = True
    try:
        yield
    finally:
        for m, before in lms:
            m._in_pass = before


@contextmanager
def _constant_mixers(mixers: list[nn.Module]):
    """Run each mixer's forward without autograd (its output is a constant to the backward)."""
    modes = []

    def off(module, args):
        modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def on(module, args, output):
        torch.set_grad_enabled(modes.pop())

    handles = [h for m in mixers for h in (m.register_forward_pre_hook(off), m.register_forward_hook(on))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def teach_signals(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                  loss_fn: Callable = summed_task_loss, through_mixers: bool = False,
                  levels: list[CMSLevel] | None = None) -> list[torch.Tensor | None]:
    """Pass 1: delta = d loss / d(output) of every token level at its initial state, detached
    (None for a level the loss does not reach)."""
    levels = token_levels(model) if levels is None else levels
    mixers = [] if through_mixers else sequence_mixers(model)
    try:
        with torch.inference_mode(False), torch.enable_grad(), _constant_mixers(mixers), _plain_calls(model):
            if ids.is_inference():  # e.g. under Lightning's inference_mode: autograd cannot save these
                ids, targets = ids.clone(), targets.clone()
            for level in levels:
                level.record, level.recorded = True, None
            loss = loss_fn(model(ids), targets)
            outs = [level.recorded for level in levels]
        used = [o for o in outs if o is not None]
        grads = iter(torch.autograd.grad(loss, used, allow_unused=True) if loss.requires_grad and used
                     else [None] * len(used))
        return [None if o is None else next(grads) for o in outs]
    finally:
        for level in levels:
            level.record, level.recorded = False, None


@contextmanager
def teaching(levels: list[CMSLevel], deltas: list[torch.Tensor | None]):
    """Pass 2 context: each level runs in-context with its teach signals."""
    try:
        for level, delta in zip(levels, deltas):
            level.teach = None if delta is None else delta.detach()
        yield
    finally:
        for level in levels:
            level.teach = None


def two_pass_forward(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                     loss_fn: Callable = summed_task_loss, through_mixers: bool = False) -> torch.Tensor:
    """The model's output with in-context updates of its token-unit CMS levels (see module doc).

    `loss_fn(output, targets)` must be a sum over tokens/examples. Differentiable w.r.t. every
    parameter through pass 2 (writes included); the teach signals are constants.
    """
    levels = token_levels(model)
    if not levels:
        return model(ids)
    deltas = teach_signals(model, ids, targets, loss_fn, through_mixers, levels)
    with teaching(levels, deltas), _plain_calls(model):
        return model(ids)


def incontext_stats(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per token level (by module path): the latest forward's mean write norm (tensors, no sync)."""
    return {name: {"write_norm": m.last_write_norm} for name, m in model.named_modules()
            if isinstance(m, CMSLevel) and m.is_token_level and m.last_write_norm is not None}


class InContextLM(CausalLM):
    """A causal LM whose token-unit CMS levels learn in context on every call.

    `model(ids)` teaches from the context's own next tokens (training and evaluation alike);
    `model(ids, targets)` from explicit targets. Without token levels it is a plain CausalLM.
    """

    def __init__(self, backbone: nn.Module, vocab_size: int, tie: bool = True):
        super().__init__(backbone, vocab_size, tie)
        self._in_pass = False

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self._in_pass or not has_token_levels(self.backbone):  # inside the passes: plain
            return super().forward(ids)
        return two_pass_forward(self, ids, next_token_targets(ids) if targets is None else targets)
