"""Knowledge incorporation from `countryinfo`: facts about countries, learned as language modelling.

A fact is (country, relation, object), rendered as a prompt and an answer, e.g.
"The capital of France is" + " Paris." The answer carries the closing period, so an exact match
also checks that the object ends where it should. Multi-valued relations (currencies, languages,
borders) make one fact per (country, relation) whose object is the list in the package's order,
joined by ", ". Languages and currencies are the package's ISO codes ("fr", "EUR"); borders are
rendered as country names.

Two streams:
- `knowledge_stream`: one experience per world region (Africa, Americas, Asia, Europe, Oceania).
  Training sequences are the fact sentences; the loss is on the whole sentence or on the answer only
  (`loss_on`). The test set holds the same facts (the point is to incorporate them), scored by
  exact match of the answer (`scorer: exact_match` = argmax at every answer token given the prompt;
  `greedy` = literal greedy decoding, same result for a causal model) or by `ranking` the true
  object among `n_candidates` objects of the same relation by likelihood.
- `knowledge_in_context_stream`: facts given earlier in one sequence and queried later in it; loss
  and score on the answers. By default the objects are counterfactual (shuffled among the
  relation's objects), so only the context can answer, not the weights.

Facts come in a fixed order (region, country name, relation); every random choice is seeded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Experience, StreamError, TaskStream
from .scoring import CandidateRanking, GreedyExactMatch, SpanExactMatch, lm_example, pad_pairs
from .text import resolve_tokenizer
from .tokenizers import Tokenizer

REGIONS = ("Africa", "Americas", "Asia", "Europe", "Oceania")

# relation -> (prompt template, countryinfo field)
RELATIONS: dict[str, tuple[str, str]] = {
    "capital": ("The capital of {} is", "capital"),
    "currency": ("The currency code of {} is", "currencies"),
    "languages": ("The language codes of {} are", "languages"),
    "subregion": ("{} lies in", "subregion"),
    "borders": ("{} borders", "borders"),
}

_SALT_COUNTRIES, _SALT_CANDIDATES, _SALT_CONTEXT = 11, 12, 13


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    region: str
    obj: str

    @property
    def prompt(self) -> str:
        return RELATIONS[self.relation][0].format(self.subject)

    @property
    def answer(self) -> str:
        return f" {self.obj}."


def _values(v) -> list[str]:
    if v is None:
        return []
    items = v if isinstance(v, (list, tuple)) else [v]
    return [str(i).strip() for i in items if str(i).strip()]


def load_facts(relations: Sequence[str] = tuple(RELATIONS), regions: Sequence[str] = REGIONS) -> list[Fact]:
    """Every fact of the given relations for countries in the given regions, in a fixed order."""
    from countryinfo import CountryInfo

    unknown = sorted(set(relations) - set(RELATIONS))
    if unknown:
        raise StreamError(f"knowledge: unknown relation(s) {unknown}; allowed: {sorted(RELATIONS)}")
    bad = sorted(set(regions) - set(REGIONS))
    if bad:
        raise StreamError(f"knowledge: unknown region(s) {bad}; allowed: {list(REGIONS)}")
    countries = CountryInfo.all()
    name_of = {c["ISO"]["alpha3"]: c["name"] for c in countries.values() if c.get("ISO", {}).get("alpha3")}
    facts = []
    for region in regions:
        members = sorted((c for c in countries.values() if c.get("region") == region), key=lambda c: c["name"])
        for c in members:
            for rel in relations:
                values = _values(c.get(RELATIONS[rel][1]))
                if rel == "capital":
                    values = values[:1]  # one entry lists its capital as a one-element list
                if rel == "borders":
                    values = [name_of[v] for v in values if v in name_of]
                if values:
                    facts.append(Fact(c["name"], rel, region, ", ".join(values)))
    return facts


def _pick_countries(facts: list[Fact], per_region: int | None, seed: int) -> list[Fact]:
    """Keep the facts of at most `per_region` seeded random countries of each region."""
    if per_region is None:
        return facts
    if per_region < 1:
        raise StreamError(f"knowledge: countries_per_region must be >= 1 or null, got {per_region}")
    rng = np.random.default_rng([seed, _SALT_COUNTRIES])
    keep = set()
    for region in dict.fromkeys(f.region for f in facts):
        names = sorted({f.subject for f in facts if f.region == region})
        keep |= {(region, n) for n in rng.permutation(names)[:per_region].tolist()}
    return [f for f in facts if (f.region, f.subject) in keep]


def _encoder(tokenizer: str | Tokenizer, facts: list[Fact], bpe_vocab_size: int) -> Tokenizer:
    """`bpe` is trained on the fact sentences themselves (fixed preprocessing, like the other streams)."""
    return resolve_tokenizer(tokenizer, [f.prompt + f.answer for f in facts], bpe_vocab_size)


def _by_region(facts: list[Fact], regions: Sequence[str]) -> list[tuple[str, list[int]]]:
    groups = [(r, [i for i, f in enumerate(facts) if f.region == r]) for r in regions]
    empty = [r for r, idx in groups if not idx]
    if empty:
        raise StreamError(f"knowledge: no facts for region(s) {empty} with the chosen relations")
    return groups


def knowledge_stream(relations: Sequence[str] = tuple(RELATIONS), regions: Sequence[str] = REGIONS,
                     countries_per_region: int | None = None, loss_on: str = "sentence",
                     scorer: str = "exact_match", n_candidates: int = 10, length_norm: bool = True,
                     tokenizer: str | Tokenizer = "byte", bpe_vocab_size: int = 1000, seed: int = 0,
                     eval_batch_size: int = 128) -> TaskStream:
    """One experience per region: learn its fact sentences, then answer their prompts."""
    if loss_on not in ("sentence", "object"):
        raise StreamError(f"knowledge: loss_on must be 'sentence' or 'object', got '{loss_on}'")
    if scorer not in ("exact_match", "greedy", "ranking"):
        raise StreamError(f"knowledge: scorer must be 'exact_match', 'greedy' or 'ranking', got '{scorer}'")
    facts = _pick_countries(load_facts(relations, regions), countries_per_region, seed)
    groups = _by_region(facts, regions)
    tok = _encoder(tokenizer, facts, bpe_vocab_size)
    prompts = tok.encode_many([f.prompt for f in facts])
    answers = tok.encode_many([f.answer for f in facts])

    train_pairs = [lm_example([(p, loss_on == "sentence"), (a, True)], tok.bos_id) for p, a in zip(prompts, answers)]
    test_pairs = [lm_example([(p, False), (a, True)], tok.bos_id) for p, a in zip(prompts, answers)]
    max_len = max(len(x) for x, _ in train_pairs)
    train, test = pad_pairs(train_pairs, max_len), pad_pairs(test_pairs, max_len)

    experiences = []
    for index, (region, idx) in enumerate(groups):
        rows = np.asarray(idx)
        experiences.append(Experience(index=index, name=region, classes=list(idx),
                                      train=train.subset(rows), test=test.subset(rows)))

    if scorer == "ranking":
        # distractors come from every country's objects, so subsampling countries keeps K
        pool = _objects_by_relation(load_facts(relations, REGIONS))
        score = CandidateRanking(candidate_sets(facts, pool, groups, tok, prompts, n_candidates, seed),
                                 _n_candidates(pool, n_candidates), eval_batch_size, length_norm)
    elif scorer == "greedy":
        score = GreedyExactMatch(eval_batch_size)
    else:
        score = SpanExactMatch(eval_batch_size)
    stream = TaskStream(name="knowledge", experiences=experiences, num_classes=len(facts), input_kind="tokens",
                        vocab_size=tok.vocab_size, pad_id=tok.pad_id, scenario="knowledge",
                        class_names=[f"{f.subject} | {f.relation}" for f in facts], objective="lm", scorer=score,
                        metric_name=score.metric_name, higher_is_better=True)
    return stream.validate()


def _objects_by_relation(facts: list[Fact]) -> dict[str, list[str]]:
    objs: dict[str, list[str]] = {}
    for f in facts:
        objs.setdefault(f.relation, [])
        if f.obj not in objs[f.relation]:
            objs[f.relation].append(f.obj)
    return objs


def _n_candidates(pool: dict[str, list[str]], n_candidates: int) -> int:
    """K: the request, capped by the relation with the fewest distinct objects (so every fact has K)."""
    fewest = min(len(v) for v in pool.values())
    k = min(n_candidates, fewest)
    if k < 2:
        raise StreamError(f"knowledge: ranking needs >= 2 candidates per relation; a relation has only {fewest} "
                          f"distinct object(s)")
    return k


def candidate_sets(facts: list[Fact], pool: dict[str, list[str]], groups, tok: Tokenizer,
                   prompts: list[list[int]], n_candidates: int, seed: int) -> dict:
    """Per experience: K sequences per fact (true object first, then seeded distractors drawn from
    `pool`, the relation's distinct objects)."""
    k = _n_candidates(pool, n_candidates)
    answer_ids = {rel: dict(zip(v, tok.encode_many([f" {o}." for o in v]))) for rel, v in pool.items()}
    rng = np.random.default_rng([seed, _SALT_CANDIDATES])
    out = {}
    for index, (_, idx) in enumerate(groups):
        pairs = []
        for i in idx:
            f = facts[i]
            others = [o for o in pool[f.relation] if o != f.obj]
            chosen = [f.obj] + [others[j] for j in rng.choice(len(others), size=k - 1, replace=False)]
            pairs += [lm_example([(prompts[i], False), (answer_ids[f.relation][o], True)], tok.bos_id) for o in chosen]
        out[index] = pad_pairs(pairs)
    return out


def knowledge_in_context_stream(relations: Sequence[str] = ("capital", "currency", "subregion"),
                                regions: Sequence[str] = REGIONS, countries_per_region: int | None = None,
                                facts_per_context: int = 8, queries_per_context: int = 2, n_train: int = 256,
                                n_test: int = 64, counterfactual: bool = True, loss_on: str = "answer",
                                tokenizer: str | Tokenizer = "byte", bpe_vocab_size: int = 1000, seed: int = 0,
                                eval_batch_size: int = 64) -> TaskStream:
    """One experience per region; each sequence states `facts_per_context` facts of that region, one per
    line, then asks `queries_per_context` of them again; loss (`loss_on: answer`, or `all` tokens) and
    exact-match score on the queried answers."""
    if not 1 <= queries_per_context <= facts_per_context:
        raise StreamError(f"knowledge_in_context: need 1 <= queries_per_context <= facts_per_context, got "
                          f"{queries_per_context} and {facts_per_context}")
    if loss_on not in ("answer", "all"):
        raise StreamError(f"knowledge_in_context: loss_on must be 'answer' or 'all', got '{loss_on}'")
    facts = _pick_countries(load_facts(relations, regions), countries_per_region, seed)
    groups = _by_region(facts, regions)
    objs = _objects_by_relation(facts)
    for region, idx in groups:
        if len(idx) < facts_per_context:
            raise StreamError(f"knowledge_in_context: region {region} has {len(idx)} facts, fewer than "
                              f"facts_per_context={facts_per_context}")
    tok = _encoder(tokenizer, facts, bpe_vocab_size)
    prompts = tok.encode_many([f.prompt for f in facts])
    all_objs = sorted({o for v in objs.values() for o in v})
    answer_of = dict(zip(all_objs, tok.encode_many([f" {o}." for o in all_objs])))
    newline = tok.encode("\n")
    context_scored = loss_on == "all"

    def sample(rng, idx: list[int]) -> tuple[list[int], list[int]]:
        chosen = rng.choice(idx, size=facts_per_context, replace=False).tolist()
        stated = {}
        for i in chosen:
            f = facts[i]
            if counterfactual:  # any object of the relation, the true one included by chance only
                pool = objs[f.relation]
                stated[i] = pool[int(rng.integers(len(pool)))]
            else:
                stated[i] = f.obj
        segments = []
        for i in chosen:
            segments += [(ids, context_scored) for ids in (prompts[i], answer_of[stated[i]], newline)]
        for n, i in enumerate(rng.choice(chosen, size=queries_per_context, replace=False).tolist()):
            if n:
                segments.append((newline, context_scored))
            segments += [(prompts[i], context_scored), (answer_of[stated[i]], True)]
        return lm_example(segments, tok.bos_id)

    experiences = []
    for index, (region, idx) in enumerate(groups):
        sets = {}
        for split, n in (("train", n_train), ("test", n_test)):
            rng = np.random.default_rng([seed, _SALT_CONTEXT, index, split == "test"])
            sets[split] = pad_pairs([sample(rng, idx) for _ in range(n)])
        experiences.append(Experience(index=index, name=region, classes=list(idx), **sets))
    score = SpanExactMatch(eval_batch_size)
    stream = TaskStream(name="knowledge_in_context", experiences=experiences, num_classes=len(facts),
                        input_kind="tokens", vocab_size=tok.vocab_size, pad_id=tok.pad_id, scenario="knowledge",
                        class_names=[f"{f.subject} | {f.relation}" for f in facts], objective="lm", scorer=score,
                        metric_name=score.metric_name, higher_is_better=True)
    return stream.validate()
