"""Token corpora on disk: written once by a tokenise step, read lazily window by window.

A token file is a flat array of token ids (`<name>.bin`, uint16 when the vocabulary fits, else
int32) next to a small JSON header (`<name>.json`: dtype, token count, vocabulary size, pad id). The
header is written last, so a file without one is an unfinished write and is refused.

`TokenWindows` serves non-overlapping windows of `seq_len + 1` tokens (x = window[:-1],
y = window[1:], as the in-memory LM streams cut them). Each window is read with one `pread` from a
file descriptor opened on first use in each process. Nothing of the corpus stays in the process:
a memory map would be the other choice, but every page it touches counts in the process's resident
set until the kernel needs the memory back, so resident memory would grow with the corpus read so
far; with reads it stays flat (the kernel's page cache still caches the file, outside the process).

`TokenRows` reads fixed-width rows instead: row i of an input file and row i of a target file
(targets may hold the ignore index -100, so their file is signed). It is how a built stream whose
targets are not the shifted inputs (knowledge facts, synthetic tasks) lives on disk
(`nlcl.streams.token_store`).

`token_files_stream` makes a task stream of such files (one experience per train/test pair);
`tokenize_text_file` is the tokenise step for a text corpus, streamed in chunks of lines.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import Experience, StreamError, TaskStream

FORMAT = "nlcl-tokens-1"


def header_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def token_dtype(vocab_size: int, ignore_index: int | None = None) -> np.dtype:
    """The narrowest dtype that holds ids 0..vocab_size-1 (and the negative ignore index, when given)."""
    if ignore_index is None:
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)
    return np.dtype(np.int16 if vocab_size <= 2**15 else np.int32)


def write_token_file(path: str | Path, chunks: Iterable[Sequence[int] | np.ndarray], vocab_size: int,
                     pad_id: int = 0, ignore_index: int | None = None) -> Path:
    """Write token ids given chunk by chunk (the corpus is never held whole) to `path` (.bin) and its
    header; returns the path. Ids must lie in [0, vocab_size); with `ignore_index` (a negative
    target that carries no loss, -100) that value is allowed too and the file is signed."""
    path = Path(path)
    if path.suffix != ".bin":
        raise StreamError(f"token file '{path}': the name must end in .bin")
    if vocab_size < 1:
        raise StreamError(f"token file '{path}': vocab_size must be >= 1, got {vocab_size}")
    if ignore_index is not None and ignore_index >= 0:
        raise StreamError(f"token file '{path}': ignore_index must be negative, got {ignore_index}")
    dtype = token_dtype(vocab_size, ignore_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    header_path(path).unlink(missing_ok=True)  # the file is unfinished until its header exists again
    part = path.with_suffix(".bin.part")
    n = 0
    with open(part, "wb") as out:
        for chunk in chunks:
            ids = np.asarray(chunk, dtype=np.int64)
            real = ids if ignore_index is None else ids[ids != ignore_index]
            if real.size and (real.min() < 0 or real.max() >= vocab_size):
                allowed = f"[0, {vocab_size})" + ("" if ignore_index is None else f" or {ignore_index}")
                raise StreamError(f"token file '{path}': ids must lie in {allowed}, got "
                                  f"{int(real.min())}..{int(real.max())} near token {n}")
            ids.astype(dtype).tofile(out)
            n += ids.size
    os.replace(part, path)
    header = {"format": FORMAT, "dtype": dtype.name, "n_tokens": n, "vocab_size": int(vocab_size), "pad_id": int(pad_id),
              "ignore_index": ignore_index}
    tmp = header_path(path).with_suffix(".json.part")
    tmp.write_text(json.dumps(header))
    os.replace(tmp, header_path(path))
    return path


def read_header(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"token file '{path}': not found")
    if not header_path(path).is_file():
        raise StreamError(f"token file '{path}': its header {header_path(path).name} is missing "
                          "(an unfinished write?); write it again with write_token_file or nlcl tokenize")
    header = json.loads(header_path(path).read_text())
    if header.get("format") != FORMAT:
        raise StreamError(f"token file '{path}': header format {header.get('format')!r}, expected {FORMAT!r}")
    size = np.dtype(header["dtype"]).itemsize * header["n_tokens"]
    if path.stat().st_size != size:
        raise StreamError(f"token file '{path}': {path.stat().st_size} bytes, its header says {size}")
    return header


class TokenWindows(Dataset):
    """Windows `windows[i]` (window w = tokens [w (L+1), (w+1)(L+1))) of a token file, read on demand."""

    def __init__(self, path: str | Path, seq_len: int, windows: range | np.ndarray | None = None):
        if seq_len < 1:
            raise StreamError(f"token file '{path}': seq_len must be >= 1, got {seq_len}")
        self.path = str(path)
        header = read_header(path)
        self.dtype = np.dtype(header["dtype"])
        self.vocab_size, self.pad_id = header["vocab_size"], header["pad_id"]
        self.seq_len = seq_len
        self.n_windows = header["n_tokens"] // (seq_len + 1)
        self.windows = range(self.n_windows) if windows is None else windows
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # opened lazily, once per process (workers, ranks)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _window(self, w: int) -> torch.Tensor:
        width = (self.seq_len + 1) * self.dtype.itemsize
        raw = os.pread(self._descriptor(), width, int(w) * width)
        return torch.from_numpy(np.frombuffer(raw, dtype=self.dtype).astype(np.int64))

    def __getitem__(self, i):
        t = self._window(self.windows[i])
        return t[:-1], t[1:]

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows start..stop-1 stacked: (x [n, L], y [n, L])."""
        t = torch.stack([self._window(w) for w in self.windows[start:stop]])
        return t[:, :-1], t[:, 1:]

    def subset(self, index) -> "TokenWindows":
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        if isinstance(self.windows, range) and len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
            picked = self.windows[int(index[0]): int(index[0]) + len(index)]  # contiguous: stays a range
        else:
            picked = np.asarray(self.windows)[index] if not isinstance(self.windows, range) else \
                np.array([self.windows[int(i)] for i in index], dtype=np.int64)
        out = TokenWindows.__new__(TokenWindows)
        out.__dict__.update(self.__dict__, windows=picked, _fd=None, _pid=None)
        return out

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}  # descriptors do not cross processes

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


class TokenRows(Dataset):
    """Rows of width `row_len` from an input token file and a target token file: item i is
    (x row i, y row i), read on demand. Both files are read through `TokenWindows` (a window of
    `row_len` tokens is a row), so they share its lazy per-process descriptors and its subsets."""

    def __init__(self, x_path: str | Path, y_path: str | Path, row_len: int, longest: int | None = None):
        if row_len < 2:
            raise StreamError(f"token rows '{x_path}': row_len must be >= 2, got {row_len}")
        self.x_rows, self.y_rows = TokenWindows(x_path, row_len - 1), TokenWindows(y_path, row_len - 1)
        if self.x_rows.n_windows != self.y_rows.n_windows:
            raise StreamError(f"token rows '{x_path}': {self.x_rows.n_windows} input rows but "
                              f"{self.y_rows.n_windows} target rows in '{y_path}'")
        self.row_len = row_len
        self.longest = longest  # longest unpadded input row, recorded when written (for the runner's checks)

    def __len__(self) -> int:
        return len(self.x_rows)

    def __getitem__(self, i):
        return self.x_rows._window(self.x_rows.windows[i]), self.y_rows._window(self.y_rows.windows[i])

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start..stop-1 stacked: (x [n, row_len], y [n, row_len])."""
        x = [self.x_rows._window(w) for w in self.x_rows.windows[start:stop]]
        y = [self.y_rows._window(w) for w in self.y_rows.windows[start:stop]]
        return torch.stack(x), torch.stack(y)

    def subset(self, index) -> "TokenRows":
        out = TokenRows.__new__(TokenRows)
        out.__dict__.update(self.__dict__, x_rows=self.x_rows.subset(index), y_rows=self.y_rows.subset(index))
        return out


def _pick(n_windows: int, n: int | None, rng: np.random.Generator, what: str):
    if n is None:
        return range(n_windows)
    if n > n_windows or n_windows == 0:
        raise StreamError(f"{what}: {n} sequences requested, the file holds {n_windows}")
    return np.sort(rng.choice(n_windows, size=n, replace=False))  # numpy samples without a full permutation


def token_files_stream(train_files: Sequence[str] = (), test_files: Sequence[str] = (), names: Sequence[str] | None = None,
                       seq_len: int = 128, train_sequences: int | None = None, test_sequences: int | None = 64,
                       seed: int = 0, eval_batch_size: int = 64) -> TaskStream:
    """One language-modelling experience per (train file, test file) pair, read from disk; R holds test
    perplexities. `train_sequences` / `test_sequences` pick that many windows at random (null = all)."""
    from .scoring import Perplexity

    if not train_files or len(train_files) != len(test_files):
        raise StreamError(f"token_files: train_files and test_files must be non-empty lists of equal length, "
                          f"got {len(train_files)} and {len(test_files)}")
    names = list(names) if names else [Path(f).stem for f in train_files]
    if len(names) != len(train_files):
        raise StreamError(f"token_files: names has {len(names)} entries for {len(train_files)} experiences")
    experiences, vocab, pad = [], 0, None
    for i, (tr, te) in enumerate(zip(train_files, test_files)):
        train, test = TokenWindows(tr, seq_len), TokenWindows(te, seq_len)
        for f, ds in ((tr, train), (te, test)):
            if pad is not None and ds.pad_id != pad:
                raise StreamError(f"token_files: '{f}' has pad id {ds.pad_id}, an earlier file {pad}")
            pad, vocab = ds.pad_id, max(vocab, ds.vocab_size)
        rng = np.random.default_rng([seed, i])
        train.windows = _pick(train.n_windows, train_sequences, rng, f"token_files '{tr}'")
        test.windows = _pick(test.n_windows, test_sequences, rng, f"token_files '{te}'")
        if len(train) == 0 or len(test) == 0:
            raise StreamError(f"token_files: experience {i} ('{names[i]}') has no window of {seq_len + 1} tokens")
        experiences.append(Experience(index=i, name=names[i], classes=[i], train=train, test=test))
    return TaskStream(name="token_files", experiences=experiences, num_classes=len(experiences), input_kind="tokens",
                      vocab_size=vocab, pad_id=pad, class_names=names, scenario="domain_incremental", objective="lm",
                      scorer=Perplexity(eval_batch_size), metric_name="perplexity", higher_is_better=False).validate()


def tokenize_text_file(source: str | Path, target: str | Path, tokenizer, chunk_chars: int = 1 << 20) -> Path:
    """The tokenise step: encode a text file in chunks of whole lines (about `chunk_chars` characters)
    and write the token file `target`; memory stays at one chunk whatever the corpus size."""
    def chunks():
        with open(source, encoding="utf-8") as fh:
            while True:
                text = "".join(fh.readlines(chunk_chars))
                if not text:
                    return
                yield tokenizer.encode(text)

    return write_token_file(target, chunks(), tokenizer.vocab_size, tokenizer.pad_id)
