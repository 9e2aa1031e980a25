"""Synthetic streams: RULER-style needle-in-a-haystack probes, MQAR, formal languages, MAD tasks.

All are language-model streams (`objective="lm"`): x = token ids [N, L], y = targets aligned with x
(-100 where nothing is scored). Every generator draws from `numpy.random.default_rng([seed, ...])`
with a salt per stream, experience and split, so a stream is a pure function of its arguments.

Families, their experiences, scores and chance levels:

- `niah` (RULER, Hsieh et al. 2024): text tasks, any tokenizer. One experience per (probe, context
  length), probe-major, in the order given (default: the six probes of the paper's Table 1 at one
  length). Probes: `s_niah_1` (7-digit number in repeated noise sentences; RULER's niah_single_1,
  the paper's pass-key column), `s_niah_2` (number in an essay-like haystack: Tiny Shakespeare or
  pydoc text), `s_niah_3` (uuid in the essay), `mk_niah` (4 needles with different keys, one
  asked), `mq_niah` (4 needles, all 4 asked), `mv_niah` (4 values for one key, all asked, in
  order of appearance). Score: exact match per answer value (the argmax at every token of the
  value), averaged over values; this is RULER's string-match score with teacher forcing. Chance:
  10^-7 for a 7-digit number, effectively 0.
- `mqar` (Arora et al. 2024, Zoology): key-value pairs, then every key queried once at random
  later positions (blank filler between). One experience per number of pairs. Score: accuracy at
  the query positions. Chance: 1 / number of value tokens.
- `formal_languages` (Irie et al. 2023, data protocol of Bhattamishra et al. 2020): Parity, (aa)*,
  (abab)*, a^n b^n, a^n b^n c^n, Shuffle-2; one experience per language. Task: at every position
  the model outputs the set of characters that may follow the prefix, end-of-string included
  (Bhattamishra's character-prediction task), encoded as one label token per set. For Parity,
  (aa)* and (abab)* the set carries exactly the membership bit that Bhattamishra's regular-language
  data encodes (plus the trivially known next letter of (abab)*); for the counter languages it is
  their k-hot target. A string counts only if every position is right. Lengths: training strings
  and Bin0 use lengths 2..50, Bin1 51..100 (`bin0`, `bin1`; for a^n b^n c^n the total length is a
  multiple of 3, for (abab)* of 4, even for (aa)*, a^n b^n and Shuffle-2). `test_bin` picks the
  test sets. Chance: the fraction of strings a constant answer gets right, 0 here.
- `mad` (Poli et al. 2024): compression, in-context recall, fuzzy in-context recall, selective
  copying, memorisation; one experience per task; score = accuracy at the target positions as in
  MAD. MAD's own sizes by default (vocabularies 16 or 256, lengths 32..256). Each task keeps its
  own token ids shifted by one (0 is padding), so vocab_size = 1 + the largest task vocabulary.
  Compression differs from MAD: MAD reconstructs the sequence from the compression token's output
  with an MLP decoder, which a causal LM cannot express; here the model reconstructs it in order
  after the compression token, from blank inputs. For recurrent models the state at the
  compression token is the bottleneck; attention can look back, so for a Transformer it is copying.
"""
from __future__ import annotations

import itertools
import re
import uuid
from typing import Sequence

import numpy as np
import torch

from .base import Experience, StreamError, TaskStream, TensorPairDataset
from .lm_domains import domain_text
from .scoring import IGNORE, PositionAccuracy, SequenceExactMatch, SpanExactMatch, lm_example, pad_pairs
from .text import resolve_tokenizer
from .tokenizers import Tokenizer

_SALT_NIAH, _SALT_MQAR, _SALT_FORMAL, _SALT_MAD = 31, 32, 33, 34


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _lm_stream(name: str, experiences: list[Experience], vocab_size: int, scorer, class_names: list[str],
               scenario: str = "task_incremental") -> TaskStream:
    return TaskStream(name=name, experiences=experiences, num_classes=len(experiences), input_kind="tokens",
                      vocab_size=vocab_size, pad_id=0, class_names=class_names, scenario=scenario,
                      objective="lm", scorer=scorer, metric_name=scorer.metric_name,
                      higher_is_better=True).validate()


# =============================================================================================
# RULER-style needle in a haystack
# =============================================================================================

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ADJECTIVES = ("amber", "bold", "calm", "damp", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "mellow", "narrow", "odd", "pale", "quiet", "rapid", "silent", "tidy", "upset", "vivid",
              "wary", "young", "zealous", "brave", "crisp", "dusty", "fierce", "glossy", "humble", "little")
NOUNS = ("anchor", "basket", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "marble", "needle", "orchard", "pepper", "quarry", "river", "saddle", "temple",
         "umbrella", "valley", "wagon", "yacht", "zebra", "bridge", "castle", "desert", "feather", "glacier",
         "hammer", "lantern")

# probe -> (haystack, value kind, needles with distinct keys, values per key, keys queried)
PROBES = {
    "s_niah_1": ("noise", "number", 1, 1, 1),
    "s_niah_2": ("essay", "number", 1, 1, 1),
    "s_niah_3": ("essay", "uuid", 1, 1, 1),
    "mk_niah": ("essay", "number", 4, 1, 1),
    "mq_niah": ("essay", "number", 4, 1, 4),
    "mv_niah": ("essay", "number", 1, 4, 1),
}


def _value(rng: np.random.Generator, kind: str) -> str:
    if kind == "number":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _keys(rng: np.random.Generator, n: int) -> list[str]:
    pick = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n, replace=False)
    return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in pick.tolist()]


def _sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in re.split(r"(?<=[.!?])\s+", text)) if s]


class Haystack:
    """Pre-tokenized filler sentences; `fill` takes them in order from a random start (wrapping),
    skipping any that would overflow the budget, until no sentence fits."""

    def __init__(self, sentences: list[str], tok: Tokenizer):
        self.pieces = tok.encode_many([s + " " for s in sentences])
        self.sizes = np.array([len(p) for p in self.pieces])
        if self.sizes.min() < 1:
            raise StreamError("niah: empty haystack sentence")

    def fill(self, budget: int, rng: np.random.Generator) -> list[list[int]]:
        out, used = [], 0
        i, misses, smallest = int(rng.integers(len(self.pieces))), 0, int(self.sizes.min())
        # a sentence that does not fit is skipped; stop when a whole cycle adds nothing
        while budget - used >= smallest and misses < len(self.pieces):
            if used + self.sizes[i] <= budget:
                out.append(self.pieces[i])
                used, misses = used + int(self.sizes[i]), 0
            else:
                misses += 1
            i = (i + 1) % len(self.pieces)
        return out


def niah_example(probe: str, context_len: int, hay: Haystack, tok: Tokenizer, rng: np.random.Generator,
                 loss_on: str) -> tuple[list[int], list[int]]:
    """One probe sequence of at most `context_len` tokens: haystack with needles, then the question."""
    _, kind, n_keys, n_values, n_queries = PROBES[probe]
    keys = _keys(rng, n_keys)
    values = {k: [_value(rng, kind) for _ in range(n_values)] for k in keys}
    what = "uuid" if kind == "uuid" else "number"
    needles = [f"One of the special magic {what}s for {k} is: {v}. " for k in keys for v in values[k]]
    needle_ids = [tok.encode(n) for n in needles]
    asked = [keys[i] for i in rng.choice(n_keys, size=n_queries, replace=False).tolist()]

    every = loss_on == "all"
    # RULER's needle; its questions, shortened so that small contexts still hold a haystack
    if n_values > 1:
        question = f"\nWhat are all the special magic {what}s for {asked[0]}? They are"
        answers = values[asked[0]]  # in order of appearance
    elif n_queries > 1:
        listed = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        question = f"\nWhat are the special magic {what}s for {listed}? In that order, they are"
        answers = [values[k][0] for k in asked]
    else:
        question = f"\nWhat is the special magic {what} for {asked[0]}? The special magic {what} for {asked[0]} is"
        answers = values[asked[0]]
    tail = [(tok.encode(question), every)]
    comma = tok.encode(",")
    for j, a in enumerate(answers):
        if j:
            tail.append((comma, every))  # unscored separator keeps the answers apart as spans
        tail.append((tok.encode(" " + a), True))

    fixed = sum(len(n) for n in needle_ids) + sum(len(ids) for ids, _ in tail)
    budget = context_len + 1 - 1 - fixed  # x is seq[:-1]; one bos
    if budget < 0:
        raise StreamError(f"niah: context_len={context_len} is too short for probe '{probe}' "
                          f"(needles and question alone take {fixed} tokens)")
    filler = hay.fill(budget, rng)
    # needles at random sentence boundaries, in key order (the order of appearance of mv values)
    slots = np.sort(rng.integers(0, len(filler) + 1, size=len(needle_ids)))
    body: list = []
    for j, piece in enumerate(filler + [None]):
        for n in np.nonzero(slots == j)[0].tolist():
            body.append((needle_ids[n], every))
        if piece is not None:
            body.append((piece, every))
    return lm_example(body + tail, tok.bos_id)


def niah_stream(probes: Sequence[str] = tuple(PROBES), context_lens: Sequence[int] = (1024,), n_train: int = 256,
                n_test: int = 64, tokenizer: str | Tokenizer = "byte", haystack: str = "shakespeare",
                haystack_chars: int = 200_000, loss_on: str = "answer", bpe_vocab_size: int = 2000, seed: int = 0,
                eval_batch_size: int = 32, data_dir=None) -> TaskStream:
    """Experiences: every probe at every context length (probe-major). `haystack`: shakespeare | pydoc."""
    bad = sorted(set(probes) - set(PROBES))
    if bad or not probes:
        raise StreamError(f"niah: unknown probe(s) {bad}; allowed: {list(PROBES)}")
    if loss_on not in ("answer", "all"):
        raise StreamError(f"niah: loss_on must be 'answer' or 'all', got '{loss_on}'")
    if haystack not in ("shakespeare", "pydoc"):
        raise StreamError(f"niah: haystack must be 'shakespeare' or 'pydoc', got '{haystack}'")
    essay = _sentences(domain_text(haystack, data_dir if haystack == "shakespeare" else None)[:haystack_chars])
    noise = _sentences(NOISE)
    tok = resolve_tokenizer(tokenizer, [" ".join(essay), NOISE], bpe_vocab_size)
    hays = {"essay": Haystack(essay, tok), "noise": Haystack(noise, tok)}
    experiences = []
    for index, (probe, length) in enumerate(itertools.product(probes, context_lens)):
        hay = hays[PROBES[probe][0]]
        sets = {}
        for split, n in (("train", n_train), ("test", n_test)):
            rng = _rng(seed, _SALT_NIAH, list(PROBES).index(probe), length, split == "test")
            sets[split] = pad_pairs([niah_example(probe, length, hay, tok, rng, loss_on) for _ in range(n)],
                                    max_len=length, what=f"niah {probe}")
        experiences.append(Experience(index=index, name=f"{probe}@{length}", classes=[index], **sets))
    return _lm_stream("niah", experiences, tok.vocab_size, SpanExactMatch(eval_batch_size),
                      [e.name for e in experiences])


# =============================================================================================
# MQAR: multi-query associative recall
# =============================================================================================

MQAR_BLANK = 1


def mqar_batch(n: int, num_kv_pairs: int, seq_len: int, vocab_size: int, rng: np.random.Generator
               ) -> TensorPairDataset:
    """n sequences: k1 v1 ... kD vD, then the D keys in random order at random later positions
    (blank token elsewhere); the target at a query position is its key's value.

    Token ids: 0 pad, 1 blank, keys [2, 2 + K), values [2 + K, vocab_size), K = (vocab_size - 2) // 2.
    """
    n_keys = (vocab_size - 2) // 2
    n_values = vocab_size - 2 - n_keys
    D = num_kv_pairs
    if D > n_keys or D > n_values:
        raise StreamError(f"mqar: {D} pairs need at least {D} keys and values; vocab_size={vocab_size} gives {n_keys}")
    if seq_len < 3 * D:
        raise StreamError(f"mqar: seq_len={seq_len} is too short for {D} pairs and {D} queries (needs {3 * D})")
    keys = np.argsort(rng.random((n, n_keys)), axis=1)[:, :D] + 2
    values = np.argsort(rng.random((n, n_values)), axis=1)[:, :D] + 2 + n_keys
    x = np.full((n, seq_len), MQAR_BLANK, dtype=np.int64)
    y = np.full((n, seq_len), IGNORE, dtype=np.int64)
    x[:, 0:2 * D:2], x[:, 1:2 * D:2] = keys, values
    region = seq_len - 2 * D
    slots = np.sort(np.argsort(rng.random((n, region)), axis=1)[:, :D], axis=1) + 2 * D
    order = np.argsort(rng.random((n, D)), axis=1)
    rows = np.arange(n)[:, None]
    x[rows, slots] = keys[rows, order]
    y[rows, slots] = values[rows, order]
    return TensorPairDataset(torch.from_numpy(x), torch.from_numpy(y))


def mqar_stream(num_kv_pairs: Sequence[int] = (4, 8, 16), seq_len: int = 128, vocab_size: int = 256,
                n_train: int = 1024, n_test: int = 256, seed: int = 0, eval_batch_size: int = 256) -> TaskStream:
    """One experience per number of key-value pairs, in the order given (harder as it grows)."""
    experiences = []
    for index, D in enumerate(num_kv_pairs):
        sets = {split: mqar_batch(n, D, seq_len, vocab_size, _rng(seed, _SALT_MQAR, D, split == "test"))
                for split, n in (("train", n_train), ("test", n_test))}
        experiences.append(Experience(index=index, name=f"mqar_{D}kv", classes=[index], **sets))
    return _lm_stream("mqar", experiences, vocab_size, PositionAccuracy(eval_batch_size),
                      [e.name for e in experiences])


# =============================================================================================
# Formal languages
# =============================================================================================

END = "$"
CHARS = "01abc()[]"  # input symbols shared by all languages: ids 1..9
LABEL_BASE = 1 + len(CHARS)  # label token = LABEL_BASE + bitmask over the language's symbols and END
FORMAL_VOCAB = LABEL_BASE + 2 ** 5


def _parity_sets(s: str) -> list[set]:
    out, ones = [], 0
    for ch in s:
        ones += ch == "1"
        out.append({"0", "1"} | ({END} if ones % 2 == 0 else set()))
    return out


def _aa_sets(s: str) -> list[set]:
    return [{"a"} | ({END} if (t + 1) % 2 == 0 else set()) for t in range(len(s))]


def _abab_sets(s: str) -> list[set]:
    return [{"abab"[(t + 1) % 4]} | ({END} if (t + 1) % 4 == 0 else set()) for t in range(len(s))]


def _anbn_sets(s: str) -> list[set]:
    out, na, nb = [], 0, 0
    for ch in s:
        na, nb = na + (ch == "a"), nb + (ch == "b")
        out.append({"a", "b"} if nb == 0 else ({"b"} if nb < na else {END}))
    return out


def _anbncn_sets(s: str) -> list[set]:
    out, na, nb, nc = [], 0, 0, 0
    for ch in s:
        na, nb, nc = na + (ch == "a"), nb + (ch == "b"), nc + (ch == "c")
        if nb == 0:
            out.append({"a", "b"})
        elif nc == 0 and nb < na:
            out.append({"b"})
        elif nc < na:
            out.append({"c"})
        else:
            out.append({END})
    return out


def _shuffle2_sets(s: str) -> list[set]:
    out, c1, c2 = [], 0, 0
    for ch in s:
        c1 += (ch == "(") - (ch == ")")
        c2 += (ch == "[") - (ch == "]")
        closes = ({")"} if c1 else set()) | ({"]"} if c2 else set())
        out.append({"(", "["} | closes | ({END} if c1 == c2 == 0 else set()))
    return out


def _sample_shuffle2(length: int, rng: np.random.Generator) -> str:
    """A uniform choice among the allowed moves at every step, closing everything by the end."""
    out, c = [], {"(": 0, "[": 0}
    close = {"(": ")", "[": "]"}
    for t in range(length):
        remaining = length - t
        moves = [o for o in "([" if sum(c.values()) + 1 <= remaining - 1] + [close[o] for o in "([" if c[o]]
        ch = moves[int(rng.integers(len(moves)))]
        out.append(ch)
        for o in "([":
            c[o] += (ch == o) - (ch == close[o])
    return "".join(out)


def _sample_parity(length: int, rng: np.random.Generator) -> str:
    bits = rng.integers(0, 2, size=length)
    bits[-1] ^= bits.sum() % 2  # uniform over even-parity strings of this length
    return "".join(map(str, bits.tolist()))


# name -> (symbols (END last), length step, sampler(length, rng), prefix target sets)
LANGUAGES = {
    "parity": ("01" + END, 1, _sample_parity, _parity_sets),
    "aa_star": ("a" + END, 2, lambda n, rng: "a" * n, _aa_sets),
    "abab_star": ("ab" + END, 4, lambda n, rng: "abab" * (n // 4), _abab_sets),
    "anbn": ("ab" + END, 2, lambda n, rng: "a" * (n // 2) + "b" * (n // 2), _anbn_sets),
    "anbncn": ("abc" + END, 3, lambda n, rng: "a" * (n // 3) + "b" * (n // 3) + "c" * (n // 3), _anbncn_sets),
    "shuffle2": ("()[]" + END, 2, _sample_shuffle2, _shuffle2_sets),
}


def set_label(symbols: str, valid: set) -> int:
    return LABEL_BASE + sum(1 << i for i, s in enumerate(symbols) if s in valid)


def formal_examples(language: str, n: int, lengths: tuple[int, int], rng: np.random.Generator
                    ) -> TensorPairDataset:
    """n strings with lengths drawn uniformly among the language's valid lengths in `lengths`."""
    symbols, step, sample, sets = LANGUAGES[language]
    lo, hi = lengths
    valid = [L for L in range(max(lo, 1), hi + 1) if L % step == 0]
    if not valid:
        raise StreamError(f"formal_languages: no string of '{language}' has a length in [{lo}, {hi}]")
    pairs = []
    for L in rng.choice(valid, size=n).tolist():
        s = sample(L, rng)
        pairs.append(([1 + CHARS.index(ch) for ch in s], [set_label(symbols, v) for v in sets(s)]))
    return pad_pairs(pairs, max_len=hi, what=f"formal_languages {language}")


def formal_languages_stream(languages: Sequence[str] = tuple(LANGUAGES), n_train: int = 2000, n_test: int = 500,
                            bin0: Sequence[int] = (2, 50), bin1: Sequence[int] = (51, 100), test_bin: int = 0,
                            seed: int = 0, eval_batch_size: int = 256) -> TaskStream:
    """One experience per language; train on Bin0 lengths, test on Bin0 or Bin1 (`test_bin`)."""
    bad = sorted(set(languages) - set(LANGUAGES))
    if bad or not languages:
        raise StreamError(f"formal_languages: unknown language(s) {bad}; allowed: {list(LANGUAGES)}")
    if test_bin not in (0, 1):
        raise StreamError(f"formal_languages: test_bin must be 0 or 1, got {test_bin}")
    bins = (tuple(bin0), tuple(bin1))
    experiences = []
    for index, lang in enumerate(languages):
        salt = list(LANGUAGES).index(lang)
        train = formal_examples(lang, n_train, bins[0], _rng(seed, _SALT_FORMAL, salt, 0))
        test = formal_examples(lang, n_test, bins[test_bin], _rng(seed, _SALT_FORMAL, salt, 1 + test_bin))
        experiences.append(Experience(index=index, name=lang, classes=[index], train=train, test=test))
    return _lm_stream("formal_languages", experiences, FORMAL_VOCAB, SequenceExactMatch(eval_batch_size),
                      list(languages))


# =============================================================================================
# MAD synthetic tasks
# =============================================================================================
# Generators below use MAD's own token ids (0..V-1); `mad_stream` shifts them by one for padding.
# Each returns (tokens, targets) aligned: targets[t] is what the model must output after reading
# tokens[:t+1] (-100 = not scored), plus the training targets.

def _next_token(seq: list[int], scored: list[bool]) -> tuple[list[int], list[int]]:
    """Shift a sequence with per-token "is an answer" flags into (x, y) next-token form."""
    return seq[:-1], [t if s else IGNORE for t, s in zip(seq[1:], scored[1:])]


def mad_compression(rng, vocab_size: int = 16, seq_len: int = 32, **_):
    """seq_len - 1 random tokens, the compression token, then reconstruct them after it from blanks."""
    compress, blank = vocab_size - 1, vocab_size  # one extra id for the blank inputs
    toks = rng.integers(0, vocab_size - 1, size=seq_len - 1).tolist()
    x = toks + [compress] + [blank] * (seq_len - 2)
    y = [IGNORE] * (seq_len - 1) + toks
    return (x, y), (x, y)


def mad_in_context_recall(rng, vocab_size: int = 16, seq_len: int = 128, multi_query: bool = True, **_):
    """Random key-value pairs (a fixed map per sequence); values of keys seen before are answers
    (`multi_query`), and a final probe key asks for one. Trained on every next token, as in MAD."""
    n_sym = vocab_size if multi_query else vocab_size - 1  # the copy prefix is the last id
    keys, vals = np.arange(n_sym // 2), np.arange(n_sym // 2, n_sym)
    kv, seq, scored = {}, [], []
    for _ in range(seq_len // 2 - 1):
        k = int(rng.choice(keys))
        seen = k in kv
        kv.setdefault(k, int(rng.choice(vals)))
        seq += [k, kv[k]]
        scored += [False, seen and multi_query]
    probe = int(rng.choice(sorted(kv)))
    if not multi_query:
        seq.append(vocab_size - 1)
        scored.append(False)
    seq += [probe, kv[probe]]
    scored += [False, True]
    return _next_token(seq, scored), _next_token(seq, [True] * len(seq))


def mad_fuzzy_in_context_recall(rng, vocab_size: int = 16, seq_len: int = 128, k_motif_size: int = 3,
                                v_motif_size: int = 3, multi_query: bool = False, train: bool = True, **_):
    """Keys and values are motifs of 1..motif_size tokens; at test time keys have the maximal size.
    A probe pair is planted in the sequence and asked again at the end after the copy prefix."""
    copy_prefix = vocab_size - 1
    n_sym = vocab_size - 2  # the last two ids: copy prefix and (in MAD) left padding
    keys, vals = np.arange(n_sym // 2), np.arange(n_sym // 2, n_sym)

    def motif(pool, size):
        return tuple(rng.choice(pool, size=size, replace=False).tolist())

    k_sizes = list(range(1, k_motif_size + 1)) if train else [k_motif_size]
    k_probe = motif(keys, int(rng.choice(k_sizes)))
    v_probe = motif(vals, int(rng.integers(1, v_motif_size + 1)))
    room = seq_len - len(k_probe) - len(v_probe) - (k_motif_size + v_motif_size)
    probe_at = int(rng.integers(max(room, 1)))
    kv, seq, scored, planted = {}, [], [], False
    while len(seq) < room or not planted:
        if not planted and len(seq) >= probe_at:
            k, v = k_probe, v_probe
            planted = True
        else:
            k = motif(keys, int(rng.choice(k_sizes)))
            v = v_probe if k == k_probe else kv.get(k) or motif(vals, int(rng.integers(1, v_motif_size + 1)))
            planted |= k == k_probe
        seen = k in kv
        kv[k] = v
        seq += [*k, *v]
        scored += [False] * len(k) + [seen and multi_query] * len(v)
    tail = ([] if multi_query else [copy_prefix]) + [*k_probe, *v_probe]
    seq += tail
    scored += [False] * (len(tail) - len(v_probe)) + [True] * len(v_probe)
    return _next_token(seq, scored), _next_token(seq, [True] * len(seq))


def mad_selective_copying(rng, vocab_size: int = 16, seq_len: int = 256, num_tokens_to_copy: int = 16, **_):
    """Tokens to copy scattered among blanks, a copy token, then the tokens in order over blanks."""
    copy, blank = vocab_size - 1, vocab_size - 2
    n_blank = seq_len - 2 * num_tokens_to_copy - 1
    if n_blank < 0:
        raise StreamError(f"mad selective_copying: seq_len={seq_len} < 2 * num_tokens_to_copy + 1")
    toks = rng.integers(0, vocab_size - 2, size=num_tokens_to_copy).tolist()
    where = np.sort(rng.choice(num_tokens_to_copy + n_blank, size=num_tokens_to_copy, replace=False))
    head = [blank] * (num_tokens_to_copy + n_blank)
    for p, t in zip(where.tolist(), toks):
        head[p] = t
    x = head + [copy] + [blank] * num_tokens_to_copy
    y = [IGNORE] * (len(head) + 1) + toks
    return (x, y), (x, y)


def mad_memorization(rng, vocab_size: int = 256, seq_len: int = 32, kv_map_seed: int = 12345, **_):
    """Keys from a map fixed across all sequences (seeded by kv_map_seed), each followed by an insert
    token at which the model must output the key's value: facts live in the weights."""
    insert = vocab_size - 1
    n_sym = vocab_size - 1
    values = np.random.default_rng(kv_map_seed).permutation(np.arange(n_sym // 2, n_sym)).tolist()
    ks = rng.integers(0, n_sym // 2, size=seq_len // 2).tolist()  # key k -> values[k]
    x = [t for k in ks for t in (k, insert)]
    y = [t for k in ks for t in (IGNORE, values[k])]
    return (x, y), (x, y)


MAD_TASKS = {
    "compression": mad_compression,
    "in_context_recall": mad_in_context_recall,
    "fuzzy_in_context_recall": mad_fuzzy_in_context_recall,
    "selective_copying": mad_selective_copying,
    "memorization": mad_memorization,
}
MAD_VOCAB = {"compression": 16, "in_context_recall": 16, "fuzzy_in_context_recall": 16, "selective_copying": 16,
             "memorization": 256}  # MAD's defaults; compression uses one more id for its blank inputs


def _shift(x: Sequence[int], y: Sequence[int]) -> tuple[list[int], list[int]]:
    return [t + 1 for t in x], [t + 1 if t != IGNORE else IGNORE for t in y]


def mad_stream(tasks: Sequence[str] = tuple(MAD_TASKS), n_train: int = 2000, n_test: int = 256,
               task_options: dict | None = None, seed: int = 0, eval_batch_size: int = 256) -> TaskStream:
    """One experience per MAD task; `task_options[task]` overrides that task's generator arguments
    (vocab_size, seq_len, num_tokens_to_copy, k_motif_size, multi_query, ...)."""
    bad = sorted(set(tasks) - set(MAD_TASKS))
    if bad or not tasks:
        raise StreamError(f"mad: unknown task(s) {bad}; allowed: {list(MAD_TASKS)}")
    options = {k: dict(v) for k, v in (task_options or {}).items()}
    unknown = sorted(set(options) - set(MAD_TASKS))
    if unknown:
        raise StreamError(f"mad: task_options names unknown task(s) {unknown}")
    experiences, vocab = [], 1
    for index, task in enumerate(tasks):
        opts = options.get(task, {})
        used = int(opts.get("vocab_size", MAD_VOCAB[task])) + (task == "compression")
        vocab = max(vocab, used + 1)  # + 1: every id is shifted past the pad id
        sets = {}
        for split, n in (("train", n_train), ("test", n_test)):
            rng = _rng(seed, _SALT_MAD, list(MAD_TASKS).index(task), split == "test")
            pairs = []
            for _ in range(n):
                test_pair, train_pair = MAD_TASKS[task](rng, train=split == "train", **opts)
                pairs.append(_shift(*(train_pair if split == "train" else test_pair)))
            sets[split] = pad_pairs(pairs, what=f"mad {task}")
        experiences.append(Experience(index=index, name=task, classes=[index], **sets))
    return _lm_stream("mad", experiences, vocab, PositionAccuracy(eval_batch_size), list(tasks))
