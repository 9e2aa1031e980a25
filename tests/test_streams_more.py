"""Knowledge, LM-domain, NIAH, MQAR, formal-language and MAD streams: structure, determinism, and
scores of models whose answers are known (an oracle gets 100% or perplexity 1; a constant model
gets the chance level counted here independently of nlcl.streams.scoring)."""
import itertools
import math
import re

import pytest
import torch
from torch import nn

from nlcl.streams import build_stream
from nlcl.streams import scoring as S
from nlcl.streams.base import StreamError
from nlcl.streams.synthetic import LANGUAGES, mqar_batch
from nlcl.streams.tokenizers import ByteTokenizer

BYTE = ByteTokenizer()
IGN = -100


# -- models whose answers are known ----------------------------------------------------------

class Oracle(nn.Module):
    """Looks each (trimmed) input row up among the datasets' rows and puts all mass on its targets.

    A row is known by its tokens up to its last target: scorers may drop later columns. Unknown
    rows get uniform logits.
    """

    def __init__(self, datasets, vocab_size: int, wrong_rows=()):
        super().__init__()
        self.vocab_size = vocab_size
        self.table, self.lengths = {}, set()
        wrong = set(wrong_rows)
        for ds in datasets:
            for i, (x, y) in enumerate(zip(ds.x.tolist(), ds.y.tolist())):
                last = max(t for t, v in enumerate(y) if v != IGN) + 1
                targets = list(y)
                if i in wrong:  # corrupt this row's last target (tests partial credit)
                    targets[last - 1] = (targets[last - 1] + 1) % vocab_size
                self.table[tuple(x[:last])] = targets
                self.lengths.add(last)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        B, L = ids.shape
        logits = torch.zeros(B, L, self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for n in sorted(self.lengths, reverse=True):  # longest match: one row may prefix another
                targets = self.table.get(tuple(row[:n])) if n <= L else None
                if targets is not None:
                    for t, v in enumerate(targets[:L]):
                        if v != IGN:
                            logits[b, t, v] = 1e4
                    break
        return logits


class Constant(nn.Module):
    """Every position: all mass on one token (or uniform when token is None)."""

    def __init__(self, vocab_size: int, token: int | None):
        super().__init__()
        self.vocab_size, self.token = vocab_size, token
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        if self.token is not None:
            logits[..., self.token] = 1e4
        return logits


# -- independent chance counts (plain loops, no nlcl.streams.scoring) ---------------------------

def spans_of(y_row):
    spans, cur = [], []
    for t, v in enumerate(y_row):
        if v != IGN:
            cur.append(v)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def constant_span_rate(ds, token):
    spans = [s for row in ds.y.tolist() for s in spans_of(row)]
    return sum(all(v == token for v in s) for s in spans) / len(spans)


def constant_position_rate(ds, token):
    ys = [v for row in ds.y.tolist() for v in row if v != IGN]
    return sum(v == token for v in ys) / len(ys)


def constant_sequence_rate(ds, token):
    rows = [[v for v in row if v != IGN] for row in ds.y.tolist()]
    rows = [r for r in rows if r]
    return sum(all(v == token for v in r) for r in rows) / len(rows)


def most_common_target(ds):
    ys = ds.y[ds.y != IGN]
    return int(torch.mode(ys).values)


# -- structure helpers -------------------------------------------------------------------------

def check_lm_structure(stream, next_token: bool):
    assert stream.objective == "lm" and stream.scorer is not None
    for e in stream.experiences:
        for ds in (e.train, e.test):
            assert ds.x.dtype == torch.long and ds.y.dtype == torch.long and ds.x.shape == ds.y.shape
            assert ds.x.min() >= 0 and ds.x.max() < stream.vocab_size
            targets = ds.y[ds.y != IGN]
            assert len(targets) and targets.min() >= 0 and targets.max() < stream.vocab_size
            # right padding: nothing is scored on a pad input
            assert bool((ds.y[ds.x == 0] == IGN).all())
            if next_token:  # y[t] is x[t+1] wherever both exist
                inner = ds.y[:, :-1]
                m = (inner != IGN) & (ds.x[:, 1:] != 0)
                assert bool((inner[m] == ds.x[:, 1:][m]).all())


def same_data(a, b):
    return all(torch.equal(ea.train.x, eb.train.x) and torch.equal(ea.train.y, eb.train.y)
               and torch.equal(ea.test.x, eb.test.x) and torch.equal(ea.test.y, eb.test.y)
               for ea, eb in zip(a.experiences, b.experiences))


def score_all(stream, model):
    with torch.no_grad():
        return [stream.scorer(model, e) for e in stream.experiences]


# -- scoring primitives ------------------------------------------------------------------------

def test_span_and_sequence_counts_match_loops():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (20, 15), generator=g)
    y[torch.rand(20, 15, generator=g) < 0.4] = IGN
    y[3] = IGN  # a row without targets
    pred = torch.randint(0, 5, (20, 15), generator=g)
    pred = torch.where(torch.rand(20, 15, generator=g) < 0.6, y.clamp_min(0), pred)
    hits = total = 0
    seq_hits = seq_total = 0
    for p_row, y_row in zip(pred.tolist(), y.tolist()):
        t = 0
        while t < len(y_row):
            if y_row[t] == IGN:
                t += 1
                continue
            s = t
            while t < len(y_row) and y_row[t] != IGN:
                t += 1
            total += 1
            hits += all(p_row[i] == y_row[i] for i in range(s, t))
        if any(v != IGN for v in y_row):
            seq_total += 1
            seq_hits += all(p == v for p, v in zip(p_row, y_row) if v != IGN)
    assert S.span_hits(pred, y) == (hits, total)
    assert S.sequence_hits(pred, y) == (seq_hits, seq_total)


def test_ranking_credit_splits_ties():
    scores = torch.tensor([[1.0, 1.0, 0.0, 1.0], [2.0, 1.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    credit = S.ranking_credit(scores, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(credit, torch.tensor([1 / 3, 1.0, 0.0]))


def test_pad_pairs_refuses_to_cut_answers():
    with pytest.raises(StreamError):
        S.pad_pairs([([1, 2, 3], [2, 3, IGN])], max_len=2)


# -- knowledge ---------------------------------------------------------------------------------

KN = dict(countries_per_region=2, regions=["Africa", "Europe", "Oceania"])


@pytest.fixture(scope="module")
def knowledge():
    return build_stream("knowledge", **KN)


def test_knowledge_structure_and_masks(knowledge):
    s = knowledge
    assert [e.name for e in s.experiences] == ["Africa", "Europe", "Oceania"]
    check_lm_structure(s, next_token=True)
    assert s.metric_name == "exact_match" and s.higher_is_better
    for e in s.experiences:
        # same facts in train and test; the train sentence is fully scored, the test only the answer
        assert torch.equal(e.train.x, e.test.x)
        for x, ytr, yte in zip(e.train.x, e.train.y, e.test.y):
            n = int((x != 0).sum())
            assert x[0] == BYTE.bos_id
            assert int((ytr != IGN).sum()) == n  # every next token of "<bos>sentence"
            sentence = BYTE.decode(x) + BYTE.decode(ytr[n - 1:n])
            answer = BYTE.decode(yte[yte != IGN])
            assert answer.endswith(".") and sentence.endswith(answer)
            prompt = sentence[: -len(answer)]
            assert re.fullmatch(r"(The capital of|The currency code of|The language codes of) .+ (is|are)"
                                r"|.+ (lies in|borders)", prompt), prompt
    obj = build_stream("knowledge", loss_on="object", **KN)
    for e, eo in zip(s.experiences, obj.experiences):
        assert torch.equal(eo.train.y, e.test.y)
    assert same_data(s, build_stream("knowledge", **KN))
    assert not same_data(s, build_stream("knowledge", **{**KN, "seed": 1}))  # other countries


def test_knowledge_facts_are_real():
    s = build_stream("knowledge", relations=["capital"], regions=["Europe"])
    texts = {BYTE.decode(x) + "." for x in s.experiences[0].train.x}
    assert {"The capital of France is Paris.", "The capital of Germany is Berlin."} <= texts


def test_knowledge_oracle_and_constant(knowledge):
    s = knowledge
    oracle = Oracle([e.test for e in s.experiences], s.vocab_size)
    assert score_all(s, oracle) == [1.0] * len(s.experiences)
    token = most_common_target(s.experiences[0].test)
    const = Constant(s.vocab_size, token)
    assert score_all(s, const) == [constant_span_rate(e.test, token) for e in s.experiences]


def test_knowledge_greedy_equals_argmax():
    kw = {**KN, "relations": ["capital", "currency"]}
    s_arg = build_stream("knowledge", **kw)
    s_greedy = build_stream("knowledge", scorer="greedy", **kw)
    # an oracle that gets the last answer token of some facts wrong, and a random causal LM
    wrong = {0, 2, 3}
    partial = Oracle([s_arg.experiences[0].test], s_arg.vocab_size, wrong_rows=wrong)
    e0 = s_arg.experiences[0]
    expected = 1 - len(wrong) / len(e0.test)
    assert s_arg.scorer(partial, e0) == pytest.approx(expected)
    assert s_greedy.scorer(partial, e0) == pytest.approx(expected)
    from nlcl.models import build_model

    torch.manual_seed(0)
    lm = build_model("transformer", input_kind="tokens", vocab_size=s_arg.vocab_size, task="lm",
                     d_model=32, n_layers=1, n_heads=2).eval()
    # a random causal LM: the greedy and the teacher-forced decisions agree row by row
    x, y = S.trimmed(e0.test.x, e0.test.y)
    with torch.no_grad():
        greedy_rows = S.greedy_span_hits(lm, x, y)
        pred = lm(x).argmax(-1)
    argmax_rows = ((pred == y) | (y == IGN)).all(1)
    assert torch.equal(greedy_rows, argmax_rows)


def test_knowledge_ranking_oracle_and_uniform():
    s = build_stream("knowledge", scorer="ranking", n_candidates=5, **KN)
    assert s.scorer.k == 5 and s.metric_name == "ranking_accuracy"
    for e in s.experiences:
        cands = s.scorer.candidates[e.index]
        assert len(cands) == 5 * len(e.test)
        # the first candidate of every fact is the true test row
        for ax, ay, bx, by in zip(cands.x[::5], cands.y[::5], e.test.x, e.test.y):
            assert ax[ax != 0].tolist() == bx[bx != 0].tolist() and ay[ay != IGN].tolist() == by[by != IGN].tolist()
        # distractors differ from the truth and from each other
        for f in range(len(e.test)):
            answers = [tuple(r[r != IGN].tolist()) for r in cands.y[5 * f: 5 * f + 5]]
            assert len(set(answers)) == 5
    oracle = Oracle([e.test for e in s.experiences], s.vocab_size)
    assert score_all(s, oracle) == [1.0] * len(s.experiences)
    uniform = Constant(s.vocab_size, None)  # every candidate alike: chance = 1/K exactly
    assert score_all(s, uniform) == pytest.approx([1 / 5] * len(s.experiences))


def test_knowledge_in_context():
    kw = dict(countries_per_region=4, regions=["Asia", "Europe"], facts_per_context=4, queries_per_context=2,
              n_train=6, n_test=5)
    s = build_stream("knowledge_in_context", **kw)
    check_lm_structure(s, next_token=True)
    for e in s.experiences:
        for x, y in zip(e.test.x, e.test.y):
            spans = spans_of(y.tolist())
            assert len(spans) == 2
            n = int((x != 0).sum())
            lines = BYTE.decode(x[:n].tolist() + [int(y[n - 1])]).split("\n")
            stated, queries = lines[:4], lines[4:]
            assert len(queries) == 2 and len(set(stated)) == 4
            # every query repeats a stated line, and its scored span is that line's answer
            for q, span in zip(queries, spans):
                assert q in stated and q.endswith(BYTE.decode(span))
    assert same_data(s, build_stream("knowledge_in_context", **kw))
    oracle = Oracle([e.test for e in s.experiences], s.vocab_size)
    assert score_all(s, oracle) == [1.0, 1.0]
    tok = most_common_target(s.experiences[0].test)
    assert score_all(s, Constant(s.vocab_size, tok)) == [constant_span_rate(e.test, tok) for e in s.experiences]


# -- LM domains --------------------------------------------------------------------------------

LMD = dict(seq_len=32, train_sequences=6, test_sequences=4, max_chars=20_000)


def test_lm_domains_structure_and_perplexity():
    s = build_stream("lm_domains", **LMD)
    assert [e.name for e in s.experiences] == ["shakespeare", "pydoc", "wikipedia"]
    assert s.metric_name == "perplexity" and not s.higher_is_better
    check_lm_structure(s, next_token=True)
    for e in s.experiences:
        assert e.train.x.shape == (6, 32) and e.test.x.shape == (4, 32)
        assert bool((e.train.y != IGN).all())  # every position scored
        assert e.test.y[:, :-1].equal(e.test.x[:, 1:])
    from nlcl.streams.lm_domains import domain_text

    for e in s.experiences:  # every window is a piece of its own domain's text
        raw = domain_text(e.name).encode("utf-8")
        for x, y in zip(e.train.x, e.train.y):
            assert bytes((torch.cat([x, y[-1:]]) - 3).tolist()) in raw
    assert same_data(s, build_stream("lm_domains", **LMD))
    assert not same_data(s, build_stream("lm_domains", **{**LMD, "seed": 3}))
    oracle = Oracle([e.test for e in s.experiences], s.vocab_size)
    assert score_all(s, oracle) == pytest.approx([1.0] * 3)
    uniform = Constant(s.vocab_size, None)  # perplexity of a uniform guess is the vocabulary size
    assert score_all(s, uniform) == pytest.approx([s.vocab_size] * 3, rel=1e-5)


def test_lm_domains_bpe_and_held_out_text():
    s = build_stream("lm_domains", tokenizer="bpe", bpe_vocab_size=400, domains=["pydoc"], **LMD)
    check_lm_structure(s, next_token=True)
    assert s.vocab_size <= 400
    from nlcl.streams.lm_domains import domain_text, split_text

    train, test = split_text(domain_text("pydoc"), 0.1, None)
    assert len(test) == len(domain_text("pydoc")) - len(train) and train + test == domain_text("pydoc")


# -- NIAH --------------------------------------------------------------------------------------

def test_niah_structure_and_answers():
    s = build_stream("niah", context_lens=[512], n_train=3, n_test=4)
    assert [e.name for e in s.experiences] == ["s_niah_1@512", "s_niah_2@512", "s_niah_3@512", "mk_niah@512",
                                              "mq_niah@512", "mv_niah@512"]
    check_lm_structure(s, next_token=True)
    n_answers = {"s_niah_1": 1, "s_niah_2": 1, "s_niah_3": 1, "mk_niah": 1, "mq_niah": 4, "mv_niah": 4}
    for e in s.experiences:
        probe = e.name.split("@")[0]
        assert e.test.x.shape == (4, 512)
        for x, y in zip(e.test.x, e.test.y):
            assert int((x != 0).sum()) > 400  # the haystack fills the context
            text = BYTE.decode(x)
            spans = [BYTE.decode(sp).strip() for sp in spans_of(y.tolist())]
            assert len(spans) == n_answers[probe]
            pattern = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}" if probe == "s_niah_3" \
                else r"\d{7}"
            needles = dict(re.findall(r"special magic \w+ for ([a-z]+-[a-z]+) is: (" + pattern + r")\.", text))
            assert len(re.findall(r"special magic \w+ for [a-z]+-[a-z]+ is: ", text)) == \
                {"mk_niah": 4, "mq_niah": 4, "mv_niah": 4}.get(probe, 1)
            for v in spans:
                assert re.fullmatch(pattern, v) and v in text  # every answer is a needle's value
            if probe in ("s_niah_1",):
                assert "The grass is green." in text
            question = text.split("\n")[-1]
            if probe in ("s_niah_1", "s_niah_2", "s_niah_3", "mk_niah"):
                key = re.search(r"for ([a-z]+-[a-z]+)\?", question).group(1)
                assert needles[key] == spans[0]
    oracle = Oracle([e.test for e in s.experiences], s.vocab_size)
    assert score_all(s, oracle) == [1.0] * 6
    five = BYTE.encode("5")[0]
    assert score_all(s, Constant(s.vocab_size, five)) == [constant_span_rate(e.test, five) for e in s.experiences]


def test_niah_lengths_bpe_and_errors():
    s = build_stream("niah", probes=["s_niah_2"], context_lens=[256, 512], n_train=2, n_test=2, tokenizer="bpe",
                     bpe_vocab_size=500, haystack="pydoc")
    assert [e.test.x.shape[1] for e in s.experiences] == [256, 512]
    check_lm_structure(s, next_token=True)
    with pytest.raises(StreamError):
        build_stream("niah", probes=["mq_niah"], context_lens=[64], n_train=1, n_test=1)
    a = build_stream("niah", probes=["mv_niah"], context_lens=[384], n_train=2, n_test=2)
    b = build_stream("niah", probes=["mv_niah"], context_lens=[384], n_train=2, n_test=2)
    assert same_data(a, b)


# -- MQAR --------------------------------------------------------------------------------------

def test_mqar_structure_and_chance():
    s = build_stream("mqar", num_kv_pairs=[2, 4], seq_len=24, vocab_size=40, n_train=8, n_test=16)
    check_lm_structure(s, next_token=False)
    for e, D in zip(s.experiences, (2, 4)):
        for x, y in zip(e.test.x.tolist(), e.test.y.tolist()):
            kv = dict(zip(x[0:2 * D:2], x[1:2 * D:2]))
            assert len(kv) == D
            queries = [(t, v) for t, v in enumerate(y) if v != IGN]
            assert sorted(x[t] for t, _ in queries) == sorted(kv) and all(kv[x[t]] == v for t, v in queries)
    oracle = Oracle([e.test for e in s.experiences], s.vocab_size)
    assert score_all(s, oracle) == [1.0, 1.0]
    tok = most_common_target(s.experiences[1].test)
    assert score_all(s, Constant(s.vocab_size, tok)) == \
        [constant_position_rate(e.test, tok) for e in s.experiences]
    import numpy as np

    big = mqar_batch(3000, 4, 16, 22, np.random.default_rng(0))
    n_values = 22 - 2 - 10
    rate = constant_position_rate(big, 2 + 10)  # the first value token
    assert abs(rate - 1 / n_values) < 4 * math.sqrt((1 / n_values) / (3000 * 4))


# -- formal languages ---------------------------------------------------------------------------

def _members(lang, max_len):
    """Every string of the language up to max_len, by brute force over the alphabet."""
    alphabet = LANGUAGES[lang][0][:-1]
    def member(s):
        if lang == "parity":
            return s.count("1") % 2 == 0
        if lang == "aa_star":
            return re.fullmatch("(aa)*", s) is not None
        if lang == "abab_star":
            return re.fullmatch("(abab)*", s) is not None
        if lang == "anbn":
            n = len(s) // 2
            return n >= 1 and s == "a" * n + "b" * n
        if lang == "anbncn":
            n = len(s) // 3
            return n >= 1 and s == "a" * n + "b" * n + "c" * n
        depth = {"(": 0, "[": 0}
        for ch in s:
            for o, c in (("(", ")"), ("[", "]")):
                depth[o] += (ch == o) - (ch == c)
                if depth[o] < 0:
                    return False
        return all(v == 0 for v in depth.values())
    return [("".join(p)) for n in range(1, max_len + 1) for p in itertools.product(alphabet, repeat=n)
            if member("".join(p))]


@pytest.mark.parametrize("lang,max_len,prefix_len", [("parity", 8, 6), ("aa_star", 10, 8), ("abab_star", 12, 8),
                                                     ("anbn", 12, 5), ("anbncn", 12, 3), ("shuffle2", 8, 3)])
def test_formal_targets_match_brute_force(lang, max_len, prefix_len):
    members = _members(lang, max_len)
    prefixes = {}
    for m in members:
        for t in range(len(m)):
            prefixes.setdefault(m[:t], set()).add(m[t])
    members_set = set(members)
    sets_fn = LANGUAGES[lang][3]
    checked = 0
    for m in members:
        for t, got in enumerate(sets_fn(m)):
            p = m[: t + 1]
            if len(p) > prefix_len:
                break
            want = prefixes.get(p, set()) | ({"$"} if p in members_set else set())
            assert got == want, (lang, p)
            checked += 1
    assert checked > 3


def test_formal_stream_structure_and_scores():
    s = build_stream("formal_languages", n_train=20, n_test=10, test_bin=1)
    s0 = build_stream("formal_languages", n_train=20, n_test=10, test_bin=0)
    check_lm_structure(s, next_token=False)
    for e, e0 in zip(s.experiences, s0.experiences):
        train_lengths = (e.train.x != 0).sum(1)
        test_lengths = (e.test.x != 0).sum(1)
        assert train_lengths.min() >= 2 and train_lengths.max() <= 50
        assert test_lengths.min() >= 51 and test_lengths.max() <= 100
        assert ((e0.test.x != 0).sum(1)).max() <= 50
        assert torch.equal(e.train.x, e0.train.x)  # the bin changes the test set only
        assert bool(((e.test.y != IGN) == (e.test.x != 0)).all())  # a label at every character
    oracle = Oracle([e.test for e in s.experiences], s.vocab_size)
    assert score_all(s, oracle) == [1.0] * 6
    for e in s.experiences:
        tok = most_common_target(e.test)
        const = Constant(s.vocab_size, tok)
        assert s.scorer(const, e) == constant_sequence_rate(e.test, tok) == 0.0


# -- MAD ---------------------------------------------------------------------------------------

MADKW = dict(n_train=6, n_test=8, task_options={"selective_copying": {"seq_len": 64, "num_tokens_to_copy": 8},
                                                "in_context_recall": {"seq_len": 64},
                                                "fuzzy_in_context_recall": {"seq_len": 64}})


def test_mad_structure():
    s = build_stream("mad", **MADKW)
    assert [e.name for e in s.experiences] == ["compression", "in_context_recall", "fuzzy_in_context_recall",
                                              "selective_copying", "memorization"]
    assert s.vocab_size == 257 and s.metric_name == "token_accuracy"
    check_lm_structure(s, next_token=False)
    e = {x.name: x for x in s.experiences}
    # compression: the answers are the tokens before the compression token, in order
    for x, y in zip(e["compression"].test.x.tolist(), e["compression"].test.y.tolist()):
        toks = x[:31]
        assert x[31] == 16 and [v for v in y if v != IGN] == toks
    # selective copying: the answers are the non-blank tokens before the copy token, in order
    for x, y in zip(e["selective_copying"].test.x.tolist(), e["selective_copying"].test.y.tolist()):
        head = x[: x.index(16)]
        assert [v for v in y if v != IGN] == [t for t in head if t != 15] and len(y) == 64
    # in-context recall: an answer is the value that followed the same key earlier in the sequence
    for x, y in zip(e["in_context_recall"].test.x.tolist(), e["in_context_recall"].test.y.tolist()):
        for t, v in enumerate(y):
            if v != IGN:
                assert any(x[j] == x[t] and x[j + 1] == v for j in range(0, t, 2))
    assert all(int((r != IGN).sum()) == len(r) - int((rx == 0).sum())
               for r, rx in zip(e["in_context_recall"].train.y, e["in_context_recall"].train.x))  # trained on all
    # memorization: one global key -> value map
    pairs = {}
    for ds in (e["memorization"].train, e["memorization"].test):
        for x, y in zip(ds.x.tolist(), ds.y.tolist()):
            for t in range(1, len(x), 2):
                assert x[t] == 256
                assert pairs.setdefault(x[t - 1], y[t]) == y[t]
    assert same_data(s, build_stream("mad", **MADKW))
    assert not same_data(s, build_stream("mad", **{**MADKW, "seed": 2}))


def test_mad_fuzzy_recall_answers_come_from_context():
    s = build_stream("mad", tasks=["fuzzy_in_context_recall"], n_train=2, n_test=10)
    for x, y in zip(s.experiences[0].test.x.tolist(), s.experiences[0].test.y.tolist()):
        n = sum(v != 0 for v in x)
        answer = [v for v in y if v != IGN]
        assert 1 <= len(answer) <= 3 and y[n - len(answer): n] == answer
        full = x[:n] + [answer[-1]]
        # the probe: copy prefix (15 + 1), a 3-token key, its value; key and value appear earlier together
        probe = full[-len(answer) - 3:]
        assert full[-len(answer) - 4] == 16
        body = full[: -len(answer) - 4]
        assert any(body[j: j + len(probe)] == probe for j in range(len(body)))


def test_mad_oracle_and_chance():
    s = build_stream("mad", **MADKW)
    oracle = Oracle([e.test for e in s.experiences], s.vocab_size)
    assert score_all(s, oracle) == [1.0] * 5
    for e in s.experiences:
        tok = most_common_target(e.test)
        assert s.scorer(Constant(s.vocab_size, tok), e) == pytest.approx(constant_position_rate(e.test, tok))


# -- through the runner ------------------------------------------------------------------------

RUNS = {
    "knowledge": ["task.countries_per_region=1", "task.regions=[Africa,Europe]", "task.relations=[capital]"],
    "lm_domains": ["task.domains=[shakespeare,pydoc]", "task.seq_len=32", "task.train_sequences=8",
                   "task.test_sequences=4", "task.max_chars=20000"],
    "niah": ["task.probes=[s_niah_1,s_niah_2]", "task.context_lens=[256]", "task.n_train=4", "task.n_test=2"],
    "mqar": ["task.num_kv_pairs=[2,4]", "task.seq_len=16", "task.vocab_size=32", "task.n_train=16", "task.n_test=8"],
    "formal_languages": ["task.languages=[parity,anbn]", "task.n_train=16", "task.n_test=8", "task.bin0=[2,12]",
                         "task.bin1=[13,20]", "task.test_bin=1"],
    "mad": ["task.tasks=[in_context_recall,memorization]", "task.n_train=8", "task.n_test=4",
            "+task.task_options.in_context_recall.seq_len=32"],
}


@pytest.mark.parametrize("task", list(RUNS))
def test_runner_smoke(task, tmp_path):
    from nlcl.config import compose, validate
    from nlcl.runner import run

    cfg = compose([f"task={task}", *RUNS[task], "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                   "trainer.epochs=1", "trainer.batch_size=8", "logger=csv", "trainer.progress_bar=false",
                   f"run_dir={tmp_path}"])
    validate(cfg)
    res = run(cfg, quiet=True)
    R = torch.tensor(res["accuracy_matrix"])
    assert R.shape == (3, 2) and torch.isfinite(R).all()
    assert all(t["steps"] >= 1 for t in res["timings"]["experiences"])
    if task == "lm_domains":
        assert res["score_name"] == "perplexity" and res["higher_is_better"] is False and bool((R > 1).all())
    else:
        assert bool(((R >= 0) & (R <= 1)).all())
