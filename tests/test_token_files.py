"""Token corpora on disk: the tokenise step, lazy windows, a real run, and resident memory that stays
flat while a corpus many times larger than the allowed growth streams through the training loader."""
import ctypes
import gc
import json

import numpy as np
import pytest
import torch

from nlcl.config import compose, validate
from nlcl.datamodule import ContinualDataModule
from nlcl.runner import run
from nlcl.streams import ByteTokenizer
from nlcl.streams.base import StreamError
from nlcl.streams.lm_domains import chunk_ids
from nlcl.streams.token_files import (TokenWindows, read_header, token_files_stream, tokenize_text_file,
                                      write_token_file)

MiB = 2**20


def _malloc_trim():
    """Hand the C allocator's freed pages back to the system (glibc), so a resident-set figure counts
    what the process holds, not what earlier tests' freed buffers left cached in the heap."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is only less exact
        pass


def rss_bytes() -> int:
    """Resident set of this process (anonymous and file-backed pages), from /proc, after the
    allocator's freed pages are handed back."""
    _malloc_trim()
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_windows_match_the_in_memory_cut(tmp_path):
    ids = np.random.default_rng(0).integers(0, 300, size=10_000)
    path = write_token_file(tmp_path / "c.bin", np.array_split(ids, 7), vocab_size=300)
    assert read_header(path)["dtype"] == "uint16" and read_header(path)["n_tokens"] == 10_000
    disk = TokenWindows(path, seq_len=31)
    mem = chunk_ids(ids, 31, None, np.random.default_rng(0), "test")  # the in-memory LM streams' cut
    assert len(disk) == len(mem) == 10_000 // 32
    for i in (0, 1, len(disk) - 1):
        assert torch.equal(disk[i][0], mem.x[i]) and torch.equal(disk[i][1], mem.y[i])
    x, y = disk.slice(3, 9)
    assert torch.equal(x, mem.x[3:9]) and torch.equal(y, mem.y[3:9])
    sub = disk.subset(torch.arange(5, 20))
    assert isinstance(sub.windows, range) and torch.equal(sub[0][0], mem.x[5])
    picked = disk.subset(torch.tensor([7, 2]))
    assert torch.equal(picked[1][1], mem.y[2])


def test_bad_token_files_are_refused_with_their_name(tmp_path):
    with pytest.raises(StreamError, match="ids must lie in"):
        write_token_file(tmp_path / "bad.bin", [[1, 2, 400]], vocab_size=300)
    assert not (tmp_path / "bad.json").exists()
    path = write_token_file(tmp_path / "ok.bin", [[1, 2, 3]], vocab_size=300)
    path.with_suffix(".json").unlink()
    with pytest.raises(StreamError, match="ok.bin.*header"):
        TokenWindows(path, 1)
    path = write_token_file(tmp_path / "short.bin", [[1, 2, 3, 4]], vocab_size=300)
    with open(path, "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(StreamError, match="bytes, its header says"):
        TokenWindows(path, 1)
    with pytest.raises(StreamError, match="equal length"):
        token_files_stream([str(path)], [])


def test_tokenize_step_and_a_real_run_on_token_files(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(3000))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text.upper())
    tok = ByteTokenizer()
    files = {}
    for name in ("a", "b"):
        files[name] = tokenize_text_file(tmp_path / f"{name}.txt", tmp_path / f"{name}.bin", tok, chunk_chars=4096)
    assert np.array_equal(np.fromfile(files["a"], dtype=np.uint16), np.array(tok.encode(text)))  # chunking is lossless
    train, test = [str(files["a"]), str(files["b"])], [str(files["a"]), str(files["b"])]
    cfg = validate(compose([f"run_dir={tmp_path / 'run'}", "task=token_files", f"task.train_files={json.dumps(train)}",
                            f"task.test_files={json.dumps(test)}", "task.seq_len=32", "task.train_sequences=64",
                            "task.test_sequences=16", "model=transformer", "model.d_model=32", "model.n_layers=1",
                            "model.n_heads=2", "trainer.batch_size=16", "trainer.progress_bar=false", "logger=csv"]))
    res = run(cfg, quiet=True)
    R = res["accuracy_matrix"]
    assert res["score_name"] == "perplexity" and len(R) == 3
    assert R[1][0] < R[0][0]  # training on the first file lowered its perplexity
    assert all(t["steps"] == 4 for t in res["timings"]["experiences"])


def test_resident_memory_stays_flat_while_a_large_corpus_streams_through(tmp_path):
    corpus_mib, allowed_mib = 192, 24  # the corpus is 8x the growth allowed
    seq_len = 4095
    rng = np.random.default_rng(0)
    n_tokens = corpus_mib * MiB // 2  # uint16
    chunk = 4 * MiB
    write_token_file(tmp_path / "big.bin", (rng.integers(0, 50_000, size=min(chunk, n_tokens - s))
                                            for s in range(0, n_tokens, chunk)), vocab_size=50_000)
    stream = token_files_stream([str(tmp_path / "big.bin")], [str(tmp_path / "big.bin")], seq_len=seq_len,
                                test_sequences=4)
    dm = ContinualDataModule(stream, batch_size=16).set_experience(0)
    loader = dm.train_dataloader()
    gc.collect()
    it = iter(loader)
    total = next(it)[0].sum()  # the first batch sets up the loader's own buffers
    before = rss_bytes()
    n_batches, peak = 1, before
    for x, _ in it:
        total += x.sum()
        n_batches += 1
        peak = max(peak, rss_bytes()) if n_batches % 64 == 0 else peak
    peak = max(peak, rss_bytes())
    growth = (peak - before) / MiB
    tokens_read = n_batches * 16 * (seq_len + 1)
    print(f"\ncorpus {corpus_mib} MiB ({n_tokens:,} tokens), read {tokens_read:,} tokens in {n_batches} batches; "
          f"resident memory {before / MiB:.0f} MiB before, peak growth {growth:.1f} MiB (allowed {allowed_mib})")
    assert tokens_read >= 0.99 * n_tokens  # every window went through
    assert growth < allowed_mib
