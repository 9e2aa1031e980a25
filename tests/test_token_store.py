"""Built token streams on disk (task.token_dir, nlcl tokenize): the stored rows are the in-memory rows,
scorers score alike, runs give the same R, and resident memory stays flat while a stored stream many
times larger than the allowed growth streams through the training loader."""
import gc
import json

import numpy as np
import pytest
import torch

from nlcl.config import ConfigError, compose, validate
from nlcl.datamodule import ContinualDataModule
from nlcl.models import build_model
from nlcl.runner import run
from nlcl.streams import build_stream
from nlcl.streams.base import Experience, StreamError, TaskStream
from nlcl.streams.scoring import IGNORE, Perplexity
from nlcl.streams.token_files import TokenRows
from nlcl.streams.token_store import MANIFEST, open_stream, save_stream, store_key
from tests.conftest import tiny_overrides
from tests.test_token_files import MiB, rss_bytes

# one small instance of every kind of token stream: LM domains, knowledge (ranked candidates and in
# context) and the synthetic tasks
STREAMS = {
    "lm_domains": dict(domains=["pydoc"], seq_len=32, train_sequences=40, test_sequences=8),
    "knowledge": dict(countries_per_region=2, scorer="ranking", n_candidates=4),
    "knowledge_in_context": dict(n_train=16, n_test=8),
    "mqar": dict(num_kv_pairs=[2, 4], seq_len=32, vocab_size=32, n_train=64, n_test=16),
    "formal_languages": dict(languages=["parity", "anbn"], n_train=32, n_test=8),
    "niah": dict(n_train=8, n_test=4),
    "mad": dict(tasks=["selective_copying", "memorization"], n_train=16, n_test=8),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stored_stream_holds_the_in_memory_rows_and_scores_alike(tmp_path, name):
    stream = build_stream(name, **STREAMS[name])
    disk = open_stream(save_stream(stream, tmp_path / name))
    assert [e.name for e in disk.experiences] == [e.name for e in stream.experiences]
    assert (disk.vocab_size, disk.pad_id, disk.objective, disk.metric_name) == \
        (stream.vocab_size, stream.pad_id, stream.objective, stream.metric_name)
    for mem, stored in zip(stream.experiences, disk.experiences):
        assert mem.classes == stored.classes
        for split in ("train", "test"):
            a, b = getattr(mem, split), getattr(stored, split)
            assert isinstance(b, TokenRows) and len(a) == len(b)
            x, y = b.slice(0, len(b))
            assert torch.equal(x, a.x) and torch.equal(y, a.y)
            assert torch.equal(b[len(b) - 1][1], a.y[-1])
    torch.manual_seed(0)
    model = build_model("transformer", input_kind="tokens", num_classes=stream.num_classes,
                        vocab_size=stream.vocab_size, pad_id=stream.pad_id, task="lm", d_model=16, n_layers=1,
                        n_heads=2).eval()
    for mem, stored in zip(stream.experiences, disk.experiences):
        assert stream.scorer(model, mem) == disk.scorer(model, stored)  # the same numbers, exactly


def _lm_run(tmp_path, name, *extra):
    task = {"lm_domains": ["task=lm_domains", "task.domains=[pydoc,wikipedia]", "task.seq_len=32", "task.train_sequences=48",
                           "task.test_sequences=16", "task.tokenizer=byte"],
            "knowledge": ["task=knowledge", "task.countries_per_region=2", "task.scorer=ranking",
                          "task.n_candidates=4", "task.regions=[Europe,Asia]"]}[name]
    cfg = validate(compose([f"run_dir={tmp_path}", *task, "model=transformer", "model.d_model=16", "model.n_layers=1",
                            "model.n_heads=2", "trainer.batch_size=16", "trainer.epochs=2", "trainer.progress_bar=false",
                            "logger=csv", *extra]))
    return run(cfg, quiet=True)


@pytest.mark.parametrize("name", ["lm_domains", "knowledge"])
def test_a_run_from_token_files_gives_the_in_memory_matrix(tmp_path, name):
    token_dir = tmp_path / "tokens"
    memory = _lm_run(tmp_path / "memory", name)
    disk = _lm_run(tmp_path / "disk", name, f"+task.token_dir={token_dir}")
    folders = list(token_dir.iterdir())
    assert len(folders) == 1 and (folders[0] / MANIFEST).is_file() and folders[0].name.startswith(name)
    print(f"\n{name}: R in memory {memory['accuracy_matrix']}\n{name}: R from disk  {disk['accuracy_matrix']}")
    assert disk["accuracy_matrix"] == memory["accuracy_matrix"]
    assert [t["steps"] for t in disk["timings"]["experiences"]] == [t["steps"] for t in memory["timings"]["experiences"]]
    stamp = (folders[0] / MANIFEST).stat().st_mtime_ns
    again = _lm_run(tmp_path / "again", name, f"+task.token_dir={token_dir}")  # opens the folder, builds nothing
    assert (folders[0] / MANIFEST).stat().st_mtime_ns == stamp and len(list(token_dir.iterdir())) == 1
    assert again["accuracy_matrix"] == memory["accuracy_matrix"]


def test_every_task_setting_names_its_own_folder():
    base = {"stream": "mqar", "seq_len": 24}
    assert store_key(base) == store_key(dict(base))
    assert store_key(base) != store_key({**base, "seq_len": 25})
    assert store_key(base).startswith("mqar-")


def test_token_dir_is_refused_for_what_it_cannot_hold(tmp_path):
    with pytest.raises(ConfigError, match="task.token_dir"):
        validate(compose(tiny_overrides(tmp_path / "a", "+task.token_dir=3")))
    with pytest.raises(StreamError, match="token_dir: stream 'clinc150' is a classify stream"):
        run(validate(compose(tiny_overrides(tmp_path / "b", f"+task.token_dir={tmp_path / 'tokens'}"))), quiet=True)
    assert not any((tmp_path / "tokens").glob("*/" + MANIFEST))  # nothing half-made is left to be opened
    with pytest.raises(StreamError, match="no stream.json"):
        open_stream(tmp_path)


class GeneratedRows(torch.utils.data.Dataset):
    """A large LM training set made on demand (seeded per row), so the tokenise step itself is tested
    to write it without holding it."""

    def __init__(self, n: int, row_len: int, vocab: int):
        self.n, self.row_len, self.vocab = n, row_len, vocab

    def __len__(self):
        return self.n

    def slice(self, start, stop):
        rows = [np.random.default_rng([7, i]).integers(1, self.vocab, size=self.row_len + 1)
                for i in range(start, min(stop, self.n))]
        t = torch.from_numpy(np.stack(rows))
        y = t[:, 1:].clone()
        y[:, : self.row_len // 4] = IGNORE  # a prompt without loss, as the knowledge and synthetic rows have
        return t[:, :-1], y


def test_resident_memory_stays_flat_while_a_large_stored_stream_streams_through(tmp_path):
    store_mib, allowed_mib = 192, 24  # inputs + targets on disk are 8x the growth allowed
    row_len, vocab = 2048, 30_000
    n_rows = store_mib * MiB // (2 * 2 * row_len)  # two files of 2-byte ids
    big = GeneratedRows(n_rows, row_len, vocab)
    small = GeneratedRows(8, row_len, vocab)
    stream = TaskStream(name="generated", experiences=[Experience(0, "big", [0], big, small)], num_classes=1,
                        vocab_size=vocab, pad_id=0, scenario="domain_incremental", objective="lm",
                        scorer=Perplexity(8), metric_name="perplexity", higher_is_better=False)
    gc.collect()
    before_write = rss_bytes()
    folder = save_stream(stream, tmp_path / "store")
    write_growth = (rss_bytes() - before_write) / MiB
    on_disk = sum(p.stat().st_size for p in folder.iterdir()) / MiB
    disk = open_stream(folder)
    loader = ContinualDataModule(disk, batch_size=16).set_experience(0).train_dataloader()
    gc.collect()
    it = iter(loader)
    total = next(it)[1].clamp_min(0).sum()  # the first batch sets up the loader's own buffers
    before = rss_bytes()
    n_batches, peak = 1, before
    for _, y in it:
        total += y.clamp_min(0).sum()
        n_batches += 1
        peak = max(peak, rss_bytes()) if n_batches % 64 == 0 else peak
    peak = max(peak, rss_bytes())
    growth = (peak - before) / MiB
    print(f"\nstored stream {on_disk:.0f} MiB on disk ({n_rows:,} rows of {row_len} tokens + targets); tokenise step "
          f"grew resident memory {write_growth:.1f} MiB; training loader read {n_batches} batches, resident memory "
          f"{before / MiB:.0f} MiB before, peak growth {growth:.1f} MiB (allowed {allowed_mib})")
    assert on_disk >= 0.99 * store_mib and n_batches == -(-n_rows // 16)  # every row went through
    assert growth < allowed_mib
    assert write_growth < allowed_mib
    x0, y0 = disk.experiences[0].train[n_rows - 1]
    gx, gy = big.slice(n_rows - 1, n_rows)
    assert torch.equal(x0, gx[0]) and torch.equal(y0, gy[0])


def test_manifest_records_the_longest_row(tmp_path):
    stream = build_stream("mqar", **STREAMS["mqar"])
    folder = save_stream(stream, tmp_path / "m")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["experiences"][0]["splits"]["train"]["longest"] == 32
    assert open_stream(folder).experiences[0].train.longest == 32


def test_nlcl_tokenize_writes_the_folder_a_run_then_opens(tmp_path, capsys):
    from nlcl.cli import main

    task = ["task=mqar", "task.num_kv_pairs=[2,4]", "task.seq_len=24", "task.vocab_size=24", "task.n_train=32",
            "task.n_test=16", f"+task.token_dir={tmp_path / 'tokens'}"]
    assert main(["tokenize", *task]) == 0
    (folder,) = (tmp_path / "tokens").iterdir()
    assert str(folder) in capsys.readouterr().out
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    cfg = validate(compose([f"run_dir={tmp_path / 'run'}", *task, "+task.first_experiences=1", "model=transformer",
                            "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "trainer.epochs=1",
                            "trainer.progress_bar=false", "logger=csv"]))
    res = run(cfg, quiet=True)
    assert len(res["accuracy_matrix"]) == 2 and list((tmp_path / "tokens").iterdir()) == [folder]
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp  # the run opened what tokenize wrote
    assert main(["tokenize", "task=mqar"]) == 2 and "task.token_dir: missing" in capsys.readouterr().err
