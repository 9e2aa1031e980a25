"""Language-model domain streams: consecutive corpora, scored by perplexity on held-out text.

Domains (the order of `domains` is the order of experiences):
- `shakespeare`: Tiny Shakespeare (shared data folder or its upstream URL);
- `pydoc`: Python's documentation topics (`pydoc_data.topics`, every CPython has it), sorted by topic;
- `wikipedia`: the 106 articles in gensim's test data (redirects skipped, markup removed with
  `filter_wiki`); the cleaned text is cached under ~/.cache/nlcl/wikipedia/ after the first parse.

Each domain's text is cut once: the first `1 - test_fraction` of its characters give training
sequences, the rest test sequences, so test text is never trained on. Both parts are tokenized and
chunked into non-overlapping windows of `seq_len + 1` tokens (x = window[:-1], y = window[1:]), of
which `train_sequences` / `test_sequences` are drawn at random (seeded; null = all).
"""
from __future__ import annotations

import bz2
import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .base import Experience, StreamError, TaskStream, TensorPairDataset
from .data_files import cache_root, find_data_file
from .scoring import Perplexity
from .text import resolve_tokenizer
from .tokenizers import Tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_SALT_TRAIN, _SALT_TEST = 21, 22


def shakespeare_text(data_dir=None) -> str:
    return find_data_file("tinyshakespeare", "input.txt", SHAKESPEARE_URL, data_dir).read_text(encoding="utf-8")


def pydoc_text(data_dir=None) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def _parse_wikipedia(path: Path) -> str:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(path, "rb") as fh:
        for title, text, _ in extract_pages(fh):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            body = re.sub(r"'{2,}", "", filter_wiki(text))  # bold/italic quote marks survive filter_wiki
            body = re.sub(r"\n{3,}", "\n\n", body).strip()
            articles.append(f"{title}\n\n{body}")
    return "\n\n".join(articles)


def wikipedia_text(data_dir=None) -> str:
    """The cleaned articles; parsed once (about 6 s) and cached as text."""
    import gensim

    source = Path(gensim.__file__).parent / "test" / "test_data" / WIKI_FILE
    if not source.is_file():
        raise StreamError(f"wikipedia domain: gensim's test article file is missing ({source}); "
                          f"pip install gensim==4.4.0")
    cached = cache_root() / "wikipedia" / (WIKI_FILE[:-4] + f".gensim-{gensim.__version__}.txt")
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = _parse_wikipedia(source)
    try:  # atomic: concurrent first runs never read a half-written cache
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".part")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home only costs the parse next time
    return text


DOMAINS = {"shakespeare": shakespeare_text, "pydoc": pydoc_text, "wikipedia": wikipedia_text}


@functools.lru_cache(maxsize=8)
def domain_text(name: str, data_dir=None) -> str:
    if name not in DOMAINS:
        raise StreamError(f"lm_domains: unknown domain '{name}'; allowed: {sorted(DOMAINS)}")
    return DOMAINS[name](data_dir)


def split_text(text: str, test_fraction: float, max_chars: int | None) -> tuple[str, str]:
    """(train part, test part): a character cut, the test part from the end of the text.

    `max_chars` keeps only the first `max_chars * (1 - f)` and the last `max_chars * f` characters.
    """
    if not 0 < test_fraction < 1:
        raise StreamError(f"lm_domains: test_fraction must be in (0, 1), got {test_fraction}")
    cut = int(len(text) * (1 - test_fraction))
    train, test = text[:cut], text[cut:]
    if max_chars is not None:
        train, test = train[: int(max_chars * (1 - test_fraction))], test[-int(max_chars * test_fraction):]
    return train, test


def chunk_ids(ids: Sequence[int], seq_len: int, n: int | None, rng: np.random.Generator,
              what: str) -> TensorPairDataset:
    """`n` random non-overlapping windows of seq_len + 1 tokens (all when None), in text order."""
    ids = np.asarray(ids, dtype=np.int64)
    windows = len(ids) // (seq_len + 1)
    if windows == 0 or (n is not None and n > windows):
        raise StreamError(f"{what}: {len(ids)} tokens give {windows} sequences of {seq_len + 1} tokens; "
                          f"{n} requested")
    pick = np.arange(windows) if n is None else np.sort(rng.choice(windows, size=n, replace=False))
    blocks = torch.from_numpy(ids[: windows * (seq_len + 1)].reshape(windows, seq_len + 1)[pick])
    return TensorPairDataset(blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous())


def lm_domains_stream(domains: Sequence[str] = ("shakespeare", "pydoc", "wikipedia"),
                      tokenizer: str | Tokenizer = "byte", seq_len: int = 128, train_sequences: int | None = 512,
                      test_sequences: int | None = 64, test_fraction: float = 0.1, max_chars: int | None = None,
                      bpe_vocab_size: int = 4000, bpe_train_chars: int = 300_000, seed: int = 0,
                      eval_batch_size: int = 64, data_dir=None) -> TaskStream:
    """One experience per domain; R holds test perplexities (lower is better)."""
    if seq_len < 1:
        raise StreamError(f"lm_domains: seq_len must be >= 1, got {seq_len}")
    if len(set(domains)) != len(domains) or not domains:
        raise StreamError(f"lm_domains: domains must be a non-empty list without repeats, got {list(domains)}")
    parts = {d: split_text(domain_text(d, data_dir if d == "shakespeare" else None), test_fraction, max_chars)
             for d in domains}
    # BPE is fixed preprocessing: trained on the training parts of every domain (a prefix of each)
    tok = resolve_tokenizer(tokenizer, [train[:bpe_train_chars] for train, _ in parts.values()], bpe_vocab_size)
    experiences = []
    for index, d in enumerate(domains):
        train_text, test_text = parts[d]
        train_ids, test_ids = tok.encode_many([train_text, test_text])
        train = chunk_ids(train_ids, seq_len, train_sequences, np.random.default_rng([seed, _SALT_TRAIN, index]),
                          f"lm_domains '{d}' train")
        test = chunk_ids(test_ids, seq_len, test_sequences, np.random.default_rng([seed, _SALT_TEST, index]),
                         f"lm_domains '{d}' test")
        experiences.append(Experience(index=index, name=d, classes=[index], train=train, test=test))
    score = Perplexity(eval_batch_size)
    stream = TaskStream(name="lm_domains", experiences=experiences, num_classes=len(domains), input_kind="tokens",
                        vocab_size=tok.vocab_size, pad_id=tok.pad_id, class_names=list(domains),
                        scenario="domain_incremental", objective="lm", scorer=score,
                        metric_name="perplexity", higher_is_better=False)
    return stream.validate()
