"""Real-data streams and tokenizers: structure, determinism, data-file lookup, tokenizer round trips."""
import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from nlcl.streams import (STREAMS, ByteTokenizer, Experience, StreamError, TaskStream, TensorPairDataset,
                          build_stream, build_tokenizer, find_data_file, gpt2_tokenizer, train_bpe)
from nlcl.streams import data_files
from nlcl.streams.data_files import subsample_per_class
from nlcl.streams.tokenizers import gpt2_files
from nlcl.streams.vision import load_mnist, pixel_permutations, read_idx

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _check_stream(stream: TaskStream):
    """Independent of validate(): classes disjoint (class-incremental), labels inside each experience's classes."""
    seen = set()
    for e in stream.experiences:
        assert len(e.train) > 0 and len(e.test) > 0
        if stream.scenario == "class_incremental":
            assert seen.isdisjoint(e.classes)
        seen |= set(e.classes)
        for ds in (e.train, e.test):
            assert set(ds.y.tolist()) <= set(e.classes)
    assert seen <= set(range(stream.num_classes))


def _same(a: TaskStream, b: TaskStream) -> bool:
    return all(ea.classes == eb.classes and torch.equal(ea.train.x, eb.train.x) and torch.equal(ea.train.y, eb.train.y)
               and torch.equal(ea.test.x, eb.test.x) for ea, eb in zip(a.experiences, b.experiences))


# -- tokenizers -----------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_padding():
    tok = ByteTokenizer()
    text = "Héllo, wörld! 日本"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.encode("A") == [ord("A") + 3]
    assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
    assert tok.decode(ids) == text
    batch = tok.encode_batch(["ab", "abcdef", ""], max_len=4)
    assert batch.dtype == torch.long and batch.shape == (3, 4)
    assert batch[0].tolist() == [ord("a") + 3, ord("b") + 3, 0, 0]
    assert tok.decode(batch[1]) == "abcd"  # truncated
    assert batch[2].tolist() == [0, 0, 0, 0]
    assert {tok.pad_id, tok.bos_id, tok.eos_id} == {0, 1, 2}


def test_gpt2_bpe_known_ids_and_round_trip():
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50258 and tok.pad_id == 0
    # GPT-2 encodes "Hello world" as [15496, 995]; shifted by one for the pad id
    assert tok.encode("Hello world") == [15497, 996]
    assert tok.eos_id == 50256 + 1
    text = "The café's naïve 日本 test\n\n  with   spaces."
    assert tok.decode(tok.encode(text)) == text
    batch = tok.encode_batch(["Hello world", "Hello world Hello world"], max_len=3)
    assert batch.tolist() == [[15497, 996, 0], [15497, 996, 18435 + 1]]  # " Hello" is 18435 in GPT-2
    encoder = json.loads(gpt2_files()[0].read_text())  # the vocabulary file itself agrees
    assert [encoder["Hello"], encoder["\u0120world"], encoder["\u0120Hello"]] == [15496, 995, 18435]
    assert build_tokenizer("gpt2") is tok  # loaded once


def test_trained_bpe_merges_and_round_trips():
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    tok = train_bpe(texts, vocab_size=300)
    assert 258 <= tok.vocab_size <= 300 and tok.pad_id == 0
    ids = tok.encode("the cat sat")
    assert 0 not in ids
    assert len(ids) < len("the cat sat")  # merges happened
    assert tok.decode(ids) == "the cat sat"
    assert tok.decode(tok.encode("zebra ünïcode")) == "zebra ünïcode"  # unseen bytes still encode
    assert train_bpe(texts, vocab_size=300).encode("the dog and the mat") == tok.encode("the dog and the mat")
    with pytest.raises(StreamError, match="vocab_size"):
        train_bpe(texts, vocab_size=100)


def test_build_tokenizer_errors():
    with pytest.raises(StreamError, match="'wordpiece'.*allowed"):
        build_tokenizer("wordpiece")
    with pytest.raises(StreamError, match="vocab_sise"):
        build_tokenizer("bpe", texts=["a b"], vocab_sise=300)
    with pytest.raises(StreamError, match="texts"):
        build_tokenizer("bpe")
    assert build_tokenizer("bpe", texts=["hello there"] * 5, vocab_size=270).vocab_size <= 270


# -- data files -----------------------------------------------------------------------------------

@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """Nothing can be found: empty NLCL_DATA, empty shared roots and cache, cwd in a temp folder."""
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("NLCL_DATA", str(env))
    monkeypatch.setattr(data_files, "shared_data_roots", lambda: [tmp_path / "shared"])
    monkeypatch.setattr(data_files, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_file_error_names_file_and_places(isolated_data):
    with pytest.raises(StreamError) as err:
        find_data_file("clinc150", "data_full.json", url=None)
    msg = str(err.value)
    assert "clinc150/data_full.json" in msg
    for place in data_files.candidate_paths("clinc150", "data_full.json"):
        assert str(place) in msg
    assert len(data_files.candidate_paths("clinc150", "data_full.json")) == 3  # env, shared, cache


def test_unreachable_url_error_and_no_partial_file(isolated_data):
    url = "http://127.0.0.1:9/data_full.json"  # discard port: connection refused at once
    with pytest.raises(StreamError) as err:
        find_data_file("clinc150", "data_full.json", url=url)
    assert url in str(err.value) and "data_full.json" in str(err.value)
    cache = isolated_data / "cache" / "clinc150"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_download_into_cache(isolated_data):
    served = isolated_data / "served"
    served.mkdir()
    (served / "tiny.txt").write_text("payload")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny.txt"
        path = find_data_file("toy", "tiny.txt", url=url)
    finally:
        server.shutdown()
    assert path == isolated_data / "cache" / "toy" / "tiny.txt"
    assert path.read_text() == "payload"
    assert [p.name for p in path.parent.iterdir()] == ["tiny.txt"]  # temp file replaced, not left behind
    assert find_data_file("toy", "tiny.txt", url=None) == path  # found in the cache next time


def _write_tiny_clinc(root: Path):
    (root / "clinc150").mkdir(parents=True)
    domains = {"animals": ["cat", "dog"], "food": ["soup", "bread"]}
    rows = lambda n: [[f"{label} text {i}", label] for label in ("cat", "dog", "soup", "bread") for i in range(n)]
    data = {"train": rows(3), "test": rows(2), "oos_train": [["what", "oos"]]}
    (root / "clinc150" / "domains.json").write_text(json.dumps(domains))
    (root / "clinc150" / "data_full.json").write_text(json.dumps(data))


def test_nlcl_data_override_wins(isolated_data, monkeypatch):
    # a shared copy exists too: NLCL_DATA must come first
    _write_tiny_clinc(isolated_data / "env")
    monkeypatch.setattr(data_files, "shared_data_roots", lambda: [SHARED])
    assert find_data_file("clinc150", "domains.json") == isolated_data / "env" / "clinc150" / "domains.json"
    stream = build_stream("clinc150")
    assert [e.name for e in stream.experiences] == ["animals", "food"]
    assert stream.class_names == ["cat", "dog", "soup", "bread"]
    assert [len(e.train) for e in stream.experiences] == [6, 6]
    tok = ByteTokenizer()
    assert tok.decode(stream.experiences[1].test.x[0]) == "soup text 0"
    # explicit data_dir is the only place looked at
    assert len(build_stream("clinc150", data_dir=isolated_data / "env" / "clinc150")) == 2
    with pytest.raises(StreamError, match="domains.json"):
        build_stream("clinc150", data_dir=isolated_data)


# -- text streams -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clinc_full():
    return build_stream("clinc150")


def test_clinc150_structure(clinc_full):
    domains = json.loads((SHARED / "clinc150" / "domains.json").read_text())
    assert len(clinc_full) == 10 and clinc_full.num_classes == 150
    assert [e.name for e in clinc_full.experiences] == list(domains)
    assert clinc_full.class_names == [i for intents in domains.values() for i in intents]
    for i, e in enumerate(clinc_full.experiences):
        assert e.classes == list(range(15 * i, 15 * i + 15))
        assert torch.bincount(e.train.y, minlength=150)[e.classes].tolist() == [100] * 15
        assert torch.bincount(e.test.y, minlength=150)[e.classes].tolist() == [30] * 15
    _check_stream(clinc_full)
    assert clinc_full.input_kind == "tokens" and clinc_full.vocab_size == 259 and clinc_full.pad_id == 0


def test_clinc150_tokens_decode_to_real_texts(clinc_full):
    data = json.loads((SHARED / "clinc150" / "data_full.json").read_text())
    by_intent = {}
    for text, intent in data["train"]:
        by_intent.setdefault(intent, set()).add(text.encode("utf-8")[:64].decode("utf-8", errors="replace"))
    tok = ByteTokenizer()
    e = clinc_full.experiences[3]
    for row in range(0, len(e.train), 97):
        intent = clinc_full.class_names[int(e.train.y[row])]
        assert tok.decode(e.train.x[row]) in by_intent[intent]


def test_clinc150_subsampling_deterministic():
    a = build_stream("clinc150", train_per_class=4, test_per_class=2, seed=3, max_len=16)
    b = build_stream("clinc150", train_per_class=4, test_per_class=2, seed=3, max_len=16)
    c = build_stream("clinc150", train_per_class=4, test_per_class=2, seed=4, max_len=16)
    assert a.experiences[0].train.x.shape == (60, 16)
    assert all(len(e.train) == 60 and len(e.test) == 30 for e in a.experiences)
    assert _same(a, b) and not _same(a, c)


def test_clinc150_gpt2_tokens():
    s = build_stream("clinc150", tokenizer="gpt2", train_per_class=2, test_per_class=1, max_len=32)
    assert s.vocab_size == 50258
    x = s.experiences[0].train.x
    assert x.max() < 50258 and (x[:, 0] != 0).all()  # every text has at least one token
    lengths = (x != 0).sum(1).float()
    byte_lengths = (build_stream("clinc150", train_per_class=2, test_per_class=1, max_len=256)
                    .experiences[0].train.x != 0).sum(1).float()
    assert lengths.mean() < byte_lengths.mean() / 2  # BPE is much shorter than bytes on English


def test_banking77_structure_and_class_order():
    full = build_stream("banking77")
    categories = json.loads((SHARED / "banking77" / "categories.json").read_text())
    assert len(full) == 7 and full.num_classes == 77 and full.class_names == categories
    assert [len(e.classes) for e in full.experiences] == [11] * 7
    assert [e.name for e in full.experiences] == [f"banking-{i}" for i in range(7)]
    assert sorted(c for e in full.experiences for c in e.classes) == list(range(77))
    assert sum(len(e.train) for e in full.experiences) == 10003
    assert sum(len(e.test) for e in full.experiences) == 3080
    _check_stream(full)
    again = build_stream("banking77", class_order_seed=0)
    other = build_stream("banking77", class_order_seed=1)
    assert [e.classes for e in again.experiences] == [e.classes for e in full.experiences]
    assert [e.classes for e in other.experiences] != [e.classes for e in full.experiences]
    small = build_stream("banking77", train_per_class=3, test_per_class=2, n_experiences=5, tokenizer="bpe",
                         bpe_vocab_size=400)
    assert [len(e.classes) for e in small.experiences] == [16, 16, 15, 15, 15]
    assert sum(len(e.train) for e in small.experiences) == 77 * 3
    assert small.vocab_size <= 400
    _check_stream(small)


# -- vision streams ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_read_idx(tmp_path):
    import gzip
    import struct
    payload = bytes(range(6))
    raw = struct.pack(">BBBB", 0, 0, 8, 2) + struct.pack(">II", 2, 3) + payload
    path = tmp_path / "a.idx.gz"
    path.write_bytes(gzip.compress(raw))
    assert read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]
    (tmp_path / "bad.idx").write_bytes(struct.pack(">BBBB", 0, 0, 8, 2) + struct.pack(">II", 2, 4) + payload)
    with pytest.raises(StreamError, match="header"):
        read_idx(tmp_path / "bad.idx")


def test_mnist_files(mnist):
    x, y = mnist["train"]
    assert x.shape == (60000, 784) and x.dtype == torch.uint8
    assert mnist["test"][0].shape == (10000, 784)
    assert torch.bincount(y).tolist()[:2] == [5923, 6742]  # the published MNIST class counts for 0 and 1


def test_split_mnist(mnist):
    s = build_stream("split_mnist")
    assert len(s) == 5 and s.num_classes == 10 and s.input_kind == "image"
    assert [e.classes for e in s.experiences] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sum(len(e.train) for e in s.experiences) == 60000
    assert sum(len(e.test) for e in s.experiences) == 10000
    x = s.experiences[2].train.x
    assert x.dtype == torch.float32 and x.shape[1] == 784 and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.99
    _check_stream(s)
    small = build_stream("split_mnist", class_order_seed=7, train_per_class=5, test_per_class=3)
    assert sorted(c for e in small.experiences for c in e.classes) == list(range(10))
    assert [e.classes for e in small.experiences] != [e.classes for e in s.experiences]
    assert all(len(e.train) == 10 and len(e.test) == 6 for e in small.experiences)
    _check_stream(small)
    assert _same(small, build_stream("split_mnist", class_order_seed=7, train_per_class=5, test_per_class=3))
    assert not _same(small, build_stream("split_mnist", class_order_seed=7, train_per_class=5, test_per_class=3, seed=1))


def test_permuted_mnist(mnist):
    s = build_stream("permuted_mnist", n_experiences=3, train_per_class=6, test_per_class=4, seed=5)
    assert s.scenario == "domain_incremental" and s.num_classes == 10 and len(s) == 3
    perms = pixel_permutations(3, seed=5)
    assert torch.equal(perms[0], torch.arange(784))
    for p in perms[1:]:
        assert torch.equal(torch.sort(p).values, torch.arange(784)) and not torch.equal(p, perms[0])
    base = s.experiences[0]
    # experience 0 is plain MNIST: its rows are real MNIST images
    raw = mnist["train"][0].float() / 255
    row = base.train.x[0]
    assert (raw == row).all(1).any()
    for e, p in zip(s.experiences, perms):
        assert e.classes == list(range(10)) and e.task_label == e.index
        assert torch.equal(e.train.x, base.train.x[:, p]) and torch.equal(e.train.y, base.train.y)
        assert torch.bincount(e.train.y).tolist() == [6] * 10
    _check_stream(s)
    assert _same(s, build_stream("permuted_mnist", n_experiences=3, train_per_class=6, test_per_class=4, seed=5))


# -- validation and registry -----------------------------------------------------------------------

def _exp(i, classes, n_train=2):
    y = torch.tensor(classes).repeat(n_train)[:n_train] if n_train else torch.zeros(0, dtype=torch.long)
    ds = TensorPairDataset(torch.zeros(len(y), 3), y)
    test = TensorPairDataset(torch.zeros(2, 3), torch.tensor(classes).repeat(2)[:2])
    return Experience(index=i, name=f"e{i}", classes=classes, train=ds, test=test)


def test_validate_rejects_empty_and_overlap():
    TaskStream("ok", [_exp(0, [0, 1]), _exp(1, [2, 3])], num_classes=4).validate()
    with pytest.raises(StreamError, match="empty training set"):
        TaskStream("s", [_exp(0, [0, 1]), _exp(1, [2, 3], n_train=0)], num_classes=4).validate()
    with pytest.raises(StreamError, match="class 1"):
        TaskStream("s", [_exp(0, [0, 1]), _exp(1, [1, 2])], num_classes=4).validate()
    TaskStream("s", [_exp(0, [0, 1]), _exp(1, [0, 1])], num_classes=4, scenario="domain_incremental").validate()


def test_subsample_per_class():
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 7)
    idx = subsample_per_class(labels, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[idx]).tolist() == [3, 2, 3]
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == len(idx)
    assert torch.equal(subsample_per_class(labels, None, torch.Generator()), torch.arange(14))
    with pytest.raises(StreamError):
        subsample_per_class(labels, 0, torch.Generator())


def test_registry_errors():
    assert set(STREAMS) >= {"clinc150", "banking77", "split_mnist", "permuted_mnist"}
    with pytest.raises(StreamError, match="'cifar'.*allowed.*clinc150"):
        build_stream("cifar")
    with pytest.raises(StreamError, match="n_experiance"):
        build_stream("split_mnist", n_experiance=3)
