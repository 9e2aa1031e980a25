"""Scorers for language-model streams, and the helpers that build their scored sequences.

Every lm stream stores x = token ids [N, L] (right-padded with 0) and y = targets [N, L] aligned
with x (y[:, t] is what the model must output after reading x[:, :t+1]; -100 = no loss). A scorer
is a callable `scorer(model, experience) -> float` that fills one cell of the matrix R; the runner
calls it under `torch.no_grad()` with the model in eval mode.

What each scorer counts:
- `PositionAccuracy`: argmax == target over all target positions (MAD's accuracy).
- `SpanExactMatch`: an answer span (a maximal run of target positions) counts when every token in
  it is the argmax; the score is the mean over spans (RULER's string match, per answer).
- `SequenceExactMatch`: a sequence counts when every target position in it is right (formal
  languages: a string is recognised only if every step's prediction is right).
- `GreedyExactMatch`: decodes the first answer span of each sequence greedily from its prompt and
  compares. For a causal model this equals `SpanExactMatch` on single-answer data (greedy decoding
  reproduces the teacher-forced argmax token by token until the first mistake); it is offered as
  the literal check and as a test of causality.
- `CandidateRanking`: log-likelihood of each candidate answer after the prompt; credit 1 when the
  true one ranks first, split evenly among exact ties (so a model that scores every candidate alike
  gets exactly 1/K).
- `Perplexity`: exp(mean negative log-likelihood over target positions); lower is better.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import Experience, StreamError, TensorPairDataset

IGNORE = -100


# -- building scored sequences ----------------------------------------------------------------

Segment = tuple[Sequence[int], bool]  # (token ids, whether the model is scored on predicting them)


def lm_example(segments: Sequence[Segment], bos_id: int | None = None) -> tuple[list[int], list[int]]:
    """Concatenate segments into one next-token example: x = seq[:-1], y = seq[1:] where scored.

    `bos_id` (when given) starts the sequence so that the first real token can be scored too.
    """
    seq: list[int] = [] if bos_id is None else [bos_id]
    scored: list[bool] = [] if bos_id is None else [False]
    for ids, flag in segments:
        seq.extend(int(i) for i in ids)
        scored.extend([flag] * len(ids))
    return seq[:-1], [t if s else IGNORE for t, s in zip(seq[1:], scored[1:])]


def pad_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int | None = None,
              pad_id: int = 0, what: str = "sequence") -> TensorPairDataset:
    """Right-pad (x, y) lists into tensors [N, L] (x with `pad_id`, y with -100).

    A sequence longer than `max_len` is an error rather than a silent cut: a cut answer would be
    scored as wrong forever.
    """
    longest = max((len(x) for x, _ in pairs), default=1)
    L = longest if max_len is None else max_len
    if longest > L:
        raise StreamError(f"{what}: a sequence has {longest} tokens, more than max_len={L}")
    xs = np.full((len(pairs), L), pad_id, dtype=np.int64)
    ys = np.full((len(pairs), L), IGNORE, dtype=np.int64)
    for row, (x, y) in enumerate(pairs):
        xs[row, : len(x)] = x
        ys[row, : len(y)] = y
    return TensorPairDataset(torch.from_numpy(xs), torch.from_numpy(ys))


# -- counting helpers (pure functions over predictions and targets) ------------------------------

def span_ids(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Number every maximal run of target positions in y [N, L]: ids [N, L] (-1 off target), count."""
    mask = y != IGNORE
    before = F.pad(mask[:, :-1], (1, 0), value=False)
    start = mask & ~before
    ids = start.flatten().cumsum(0).view_as(mask) - 1
    return torch.where(mask, ids, torch.full_like(ids, -1)), int(start.sum())


def span_hits(pred: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(spans fully right, spans) for predictions pred [N, L] against targets y [N, L]."""
    ids, n = span_ids(y)
    wrong = (pred != y) & (y != IGNORE)
    bad = torch.zeros(n, dtype=torch.bool, device=y.device)
    bad[ids[wrong]] = True
    return n - int(bad.sum()), n


def sequence_hits(pred: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(sequences with every target right, sequences that have a target)."""
    mask = y != IGNORE
    has = mask.any(1)
    ok = ((pred == y) | ~mask).all(1) & has
    return int(ok.sum()), int(has.sum())


def position_hits(pred: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    mask = y != IGNORE
    return int(((pred == y) & mask).sum()), int(mask.sum())


def target_logprobs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(target) per position [N, L], 0 where there is no target."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    safe = y.clamp_min(0)
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(y != IGNORE, lp, torch.zeros_like(lp))


# -- running a model over a dataset ------------------------------------------------------------

def model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        b = next(iter(model.buffers()), None)
        return b.device if b is not None else torch.device("cpu")
    return p.device


def batches(ds: TensorPairDataset, batch_size: int, device):
    for i in range(0, len(ds), batch_size):
        if hasattr(ds, "slice"):  # read from disk (token files): only this batch is loaded
            x, y = ds.slice(i, i + batch_size)
            yield x.to(device), y.to(device)
        else:
            yield ds.x[i:i + batch_size].to(device), ds.y[i:i + batch_size].to(device)


def trimmed(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop columns after the last target: a causal model never needs them to score."""
    cols = (y != IGNORE).any(0).nonzero()
    end = int(cols.max()) + 1 if len(cols) else 1
    return x[:, :end], y[:, :end]


class _Scorer:
    """Common parts: batch size, device lookup, and a readable repr for logs."""

    metric_name = "score"
    higher_is_better = True

    def __init__(self, batch_size: int = 64):
        if batch_size < 1:
            raise StreamError(f"scorer batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size})"


class _ArgmaxCounter(_Scorer):
    count = staticmethod(position_hits)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, experience: Experience) -> float:
        hits = total = 0
        for x, y in batches(experience.test, self.batch_size, model_device(model)):
            x, y = trimmed(x, y)
            h, n = self.count(model(x).argmax(-1), y)
            hits, total = hits + h, total + n
        if total == 0:
            raise StreamError(f"experience '{experience.name}': its test set has no target positions")
        return hits / total


class PositionAccuracy(_ArgmaxCounter):
    metric_name = "token_accuracy"
    count = staticmethod(position_hits)


class SpanExactMatch(_ArgmaxCounter):
    metric_name = "exact_match"
    count = staticmethod(span_hits)


class SequenceExactMatch(_ArgmaxCounter):
    metric_name = "sequence_accuracy"
    count = staticmethod(sequence_hits)


class Perplexity(_Scorer):
    metric_name = "perplexity"
    higher_is_better = False

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, experience: Experience) -> float:
        nll = torch.zeros((), dtype=torch.float64)
        total = 0
        for x, y in batches(experience.test, self.batch_size, model_device(model)):
            x, y = trimmed(x, y)
            nll -= target_logprobs(model(x), y).sum().double().cpu()
            total += int((y != IGNORE).sum())
        if total == 0:
            raise StreamError(f"experience '{experience.name}': its test set has no target positions")
        return math.exp(float(nll) / total)


def first_spans(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start position and length of the first answer span of every row of y [N, L]."""
    mask = y != IGNORE
    if not bool(mask.any(1).all()):
        raise StreamError("greedy scoring: a test sequence has no answer")
    start = mask.float().argmax(1)
    pos = torch.arange(y.shape[1], device=y.device)
    # the span ends at the first non-target position after its start (or at the end of the row)
    gap = (~mask) & (pos[None] > start[:, None])
    end = torch.where(gap.any(1), gap.float().argmax(1), torch.full_like(start, y.shape[1]))
    return start, end - start


@torch.no_grad()
def greedy_span_hits(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Greedy-decode each row's first answer span from its prompt; True where it matches exactly.

    Needs next-token data (the answer's tokens also appear in x one step later), as the knowledge
    streams store. Decoding is batched: one forward per generated token.
    """
    start, length = first_spans(y)
    rows = torch.arange(len(x), device=x.device)
    buf = x.clone()
    ok = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for j in range(int(length.max())):
        active = j < length
        at = (start + j).clamp(max=x.shape[1] - 1)
        pred = model(buf)[rows, at].argmax(-1)
        ok &= ~active | (pred == y[rows, at])
        nxt = at + 1
        write = active & (nxt < x.shape[1])
        buf[rows[write], nxt[write]] = pred[write]
    return ok


class GreedyExactMatch(_Scorer):
    metric_name = "exact_match"

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, experience: Experience) -> float:
        hits = total = 0
        for x, y in batches(experience.test, self.batch_size, model_device(model)):
            x, y = trimmed(x, y)
            ok = greedy_span_hits(model, x, y)
            hits, total = hits + int(ok.sum()), total + len(ok)
        return hits / total


def ranking_credit(scores: torch.Tensor, true_index: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Credit per row of scores [F, K]: 1/(#tied at the top) when the true candidate is among them."""
    top = scores.max(1, keepdim=True).values
    tied = scores >= top - rel_tol * top.abs().clamp_min(1.0)
    true_tied = tied.gather(1, true_index[:, None]).squeeze(1)
    return true_tied.float() / tied.sum(1).float()


class CandidateRanking(_Scorer):
    """Rank each fact's true object among K candidates by the model's log-likelihood after the prompt.

    `candidates[experience.index]` holds the K sequences of every fact, fact-major, the true one
    first (its place does not matter: ties share credit). `length_norm` ranks by mean log-probability
    per answer token instead of the sum (the sum favours short answers).
    """

    metric_name = "ranking_accuracy"

    def __init__(self, candidates: dict[int, TensorPairDataset], n_candidates: int, batch_size: int = 64,
                 length_norm: bool = True):
        super().__init__(batch_size)
        self.candidates, self.k, self.length_norm = candidates, n_candidates, length_norm

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, experience: Experience) -> float:
        ds = self.candidates[experience.index]
        scores = []
        for x, y in batches(ds, self.batch_size, model_device(model)):
            x, y = trimmed(x, y)
            lp = target_logprobs(model(x), y).sum(1)
            if self.length_norm:
                lp = lp / (y != IGNORE).sum(1).clamp_min(1)
            scores.append(lp.cpu())
        scores = torch.cat(scores).view(-1, self.k)
        return float(ranking_credit(scores, torch.zeros(len(scores), dtype=torch.long)).mean())


SCORERS = {
    "exact_match": SpanExactMatch,
    "greedy": GreedyExactMatch,
    "token_accuracy": PositionAccuracy,
    "sequence_accuracy": SequenceExactMatch,
    "perplexity": Perplexity,
}
