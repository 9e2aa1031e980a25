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
- **Exact, causal teach signals (default).** For a per-token objective (targets [B, T]) pass 1
  runs the whole model differentiably and, for every chunk c of a level's period, takes
  delta_t = d L_c / d o_t for the tokens t of chunk c, where L_c is the summed loss of chunk c's own
  tokens: one backward per chunk (and per distinct period), none per token. That is the chain-rule
  gradient of the chunk's losses with respect to the weights that chunk reads (Eq. 71), through the
  mixers of every later block, for the levels of every block. It is causal: chunk c's write uses
  the targets of chunk c only, and only later chunks read it. (The literal single backward of the
  whole sequence's loss would also carry later chunks' losses into chunk c's delta -- future
  targets leaking into the next chunk's outputs, digest §10 pitfall 2; `through_mixers=True` keeps
  that version as an ablation.) `model.cms.teach_signals: frozen_mixers` gives the older, cheaper
  signals (one backward instead of one per chunk; about 4x cheaper in pass 1 at 128 tokens and
  chunks of 16): mixers run as
  constants in pass 1, so delta_t = d l_t / d o_t along token t's own residual stream only, which is
  exact for the last block's levels and misses the paths through later mixers below it.
  Classifier targets ([B], one loss at the last token) use the constant-mixer signals: their writes
  are read only by padding either way.
- **Per-token sums.** The teach loss is a sum over tokens, not a batch mean, so a sequence's
  fast weights do not depend on what else is in the batch; `inner_lr` is a step per token of error.
- **Language models** learn in context from the context itself: `InContextLM(ids)` takes the
  next tokens of the input as targets (`next_token_targets`), at training and at evaluation alike.
  Chunk c's write uses the targets of chunk c's tokens, i.e. the inputs up to the first token of
  chunk c+1, and only tokens from chunk c+1 on read it: causal. The boundary token (the last
  input) has no target inside the context; it lies in the last chunk, whose write is never read,
  so it costs nothing. For a stream whose targets are the shifted inputs (LM domain streams) this
  is exactly the task loss; `targets=` teaches from explicit task targets instead (e.g. answers
  only): the Learner passes each training batch's targets (`learns_from_targets`).
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
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least, float64 stays
    return F.cross_entropy(wide.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")


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
                  levels: list[CMSLevel] | None = None, exact: bool | None = None) -> list[torch.Tensor | None]:
    """Pass 1: delta = d loss / d(output) of every token level at its initial state, detached
    (None for a level the loss does not reach). `exact` (with per-token targets [B, T]): per chunk,
    the gradient of that chunk's own summed losses through the whole model (module doc); None: as
    the levels' `model.cms.teach_signals` say."""
    levels = token_levels(model) if levels is None else levels
    if exact is None:
        exact = all(level.exact_teach for level in levels)
    chunked = exact and not through_mixers and targets.dim() == 2
    mixers = [] if (through_mixers or chunked) else sequence_mixers(model)
    try:
        with torch.inference_mode(False), torch.enable_grad(), _constant_mixers(mixers), _plain_calls(model):
            if ids.is_inference():  # e.g. under Lightning's inference_mode: autograd cannot save these
                ids, targets = ids.clone(), targets.clone()
            for level in levels:
                level.record, level.recorded = True, None
            output = model(ids)
            outs = [level.recorded for level in levels]
            if chunked:
                return _chunk_teach_signals(output, targets, levels, outs)
            loss = loss_fn(output, targets)
        used = [o for o in outs if o is not None]
        grads = iter(torch.autograd.grad(loss, used, allow_unused=True) if loss.requires_grad and used
                     else [None] * len(used))
        return [None if o is None else next(grads) for o in outs]
    finally:
        for level in levels:
            level.record, level.recorded = False, None


def _chunk_teach_signals(logits: torch.Tensor, targets: torch.Tensor, levels: list[CMSLevel],
                         outs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """delta[:, chunk c] = d (summed loss of chunk c) / d out[:, chunk c], per level period."""
    T = targets.shape[1]
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least, float64 stays
    per_token = F.cross_entropy(wide.flatten(0, -2), targets.flatten(), ignore_index=IGNORE,
                                reduction="none").view(targets.shape)
    deltas = [None if o is None else torch.zeros_like(o) for o in outs]
    if not per_token.requires_grad:
        return deltas
    by_period: dict[int, list[int]] = {}
    for i, (level, o) in enumerate(zip(levels, outs)):
        if o is not None:
            by_period.setdefault(level.spec.period, []).append(i)
    for C, idx in by_period.items():
        for start in range(0, T - C, C):  # the last chunk's write is never read: no signal needed
            grads = torch.autograd.grad(per_token[:, start:start + C].sum(), [outs[i] for i in idx],
                                        retain_graph=True, allow_unused=True)
            for i, g in zip(idx, grads):
                if g is not None:
                    deltas[i][:, start:start + C] = g[:, start:start + C]
    return deltas


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

    @property
    def learns_from_targets(self) -> bool:
        """The learner passes the task's targets to `forward` when this is true."""
        return has_token_levels(self.backbone)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self._in_pass or not has_token_levels(self.backbone):  # inside the passes: plain
            return super().forward(ids)
        return two_pass_forward(self, ids, next_token_targets(ids) if targets is None else targets)
