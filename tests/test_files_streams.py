"""A user's own data without code: tables (CSV, JSONL, Parquet), image folders, Hugging Face
`datasets` and avalanche benchmarks become streams; the files are written by the tests."""
import csv
import json

import pandas as pd
import pytest
import torch

from nlcl.config import ConfigError, compose, validate
from nlcl.runner import run
from nlcl.streams import StreamError, build_stream, from_avalanche

LONG = "a class name much longer than seven characters"
CLASSES = [LONG, "billing", "cancel", "delivery", "exchange", "feedback"]


def _rows(per_class=10):
    rows = []
    for ci, c in enumerate(CLASSES):
        for k in range(per_class):
            # the text says its class, so a tiny model can learn it
            rows.append({"utterance": f"{c} {k}", "intent": c, "domain": "shop" if ci < 3 else "post",
                         "part": "test" if k < 3 else "train"})
    return rows


@pytest.fixture
def table(tmp_path):
    rows = _rows()
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "data.parquet")
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return tmp_path


def _cols(**kw):
    return {"text_column": "utterance", "label_column": "intent", **kw}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_table_format_gives_the_same_stream(table, fmt):
    s = build_stream("files", path=str(table / f"data.{fmt}"), n_experiences=3, **_cols())
    assert s.class_names == sorted(CLASSES) and LONG in s.class_names  # names in full
    assert [len(e.classes) for e in s.experiences] == [2, 2, 2] and s.scenario == "class_incremental"
    # a seeded 20% of each class is test: 2 of 10
    assert all(len(e.train) == 16 and len(e.test) == 4 for e in s.experiences)
    assert s.input_kind == "tokens" and s.vocab_size and s.experiences[0].train.x.dtype == torch.long
    ref = build_stream("files", path=str(table / "data.csv"), n_experiences=3, **_cols())
    for a, b in zip(s.experiences, ref.experiences):
        assert a.name == b.name and torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_experiences_by_column_with_the_split_column(table):
    s = build_stream("files", path=str(table / "data.csv"), experience_column="domain", split_column="part", **_cols())
    assert [e.name for e in s.experiences] == ["shop", "post"]
    names = [[s.class_names[c] for c in e.classes] for e in s.experiences]
    assert names == [sorted(CLASSES[:3]), sorted(CLASSES[3:])]
    assert [len(e.train) for e in s.experiences] == [21, 21] and [len(e.test) for e in s.experiences] == [9, 9]


def test_explicit_class_lists_a_class_order_and_a_test_file(table):
    df = pd.DataFrame(_rows())
    df[df.part == "train"].to_csv(table / "train.csv", index=False)
    df[df.part == "test"].to_csv(table / "test.csv", index=False)
    s = build_stream("files", path=str(table / "train.csv"), test_path=str(table / "test.csv"),
                     experiences={"first": ["cancel", LONG], "then": ["feedback"]}, **_cols())
    assert [e.name for e in s.experiences] == ["first", "then"] and s.class_names == sorted(["cancel", LONG, "feedback"])
    assert [len(e.test) for e in s.experiences] == [6, 3]  # the other classes are left out
    order = list(reversed(CLASSES))
    s = build_stream("files", path=str(table / "data.csv"), class_order=order, n_experiences=2, **_cols())
    assert [[s.class_names[c] for c in e.classes] for e in s.experiences] == [order[:3], order[3:]]
    shuffled = build_stream("files", path=str(table / "data.csv"), class_order_seed=1, n_experiences=6, **_cols())
    again = build_stream("files", path=str(table / "data.csv"), class_order_seed=1, n_experiences=6, **_cols())
    assert [e.name for e in shuffled.experiences] == [e.name for e in again.experiences]
    assert sorted(e.name for e in shuffled.experiences) == sorted(CLASSES)  # one class each, named in full


def test_domain_incremental_when_a_column_repeats_classes(tmp_path):
    rows = [{"text": f"{c} {d} {k}", "label": c, "site": d} for d in ("north", "south") for c in ("yes", "no")
            for k in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    s = build_stream("files", path=str(tmp_path / "d.csv"), experience_column="site", test_fraction=0.5)
    assert s.scenario == "domain_incremental" and [e.classes for e in s.experiences] == [[0, 1], [0, 1]]
    assert [e.task_label for e in s.experiences] == [0, 1]
    assert all(len(e.test) == 6 for e in s.experiences)  # half of each (class, site) cell


@pytest.mark.parametrize("options, field", [
    ({"text_column": "nope"}, "task.text_column"),
    ({"label_column": "nope"}, "task.label_column"),
    ({}, "task: say how"),
    ({"n_experiences": 99}, "task.n_experiences"),
    ({"experiences": [["billing", "unknown"]]}, "task.experiences"),
    ({"class_order": ["billing"], "n_experiences": 2}, "task.class_order"),
    ({"split_column": "domain", "n_experiences": 2}, "task.split_column"),
    ({"test_fraction": 1.5, "n_experiences": 2}, "task.test_fraction"),
    ({"format": "xls", "n_experiences": 2}, "task.format"),
])
def test_bad_input_names_the_field(table, options, field):
    opts = {"text_column": "utterance", "label_column": "intent", **options}
    with pytest.raises(StreamError, match=field.replace(".", r"\.")):
        build_stream("files", path=str(table / "data.csv"), **opts)


def test_a_missing_file_and_a_missing_path_are_named(tmp_path):
    with pytest.raises(StreamError, match=r"task\.path: no file at"):
        build_stream("files", path=str(tmp_path / "none.csv"), n_experiences=2)
    with pytest.raises(ConfigError, match=r"task\.path"):
        validate(compose([f"run_dir={tmp_path}/r", "task=files"]))


def test_image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("test", 2)):
        for ci, c in enumerate(["circle", "square", "triangle", "star"]):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for k in range(n):
                pixels = (torch.rand(10, 12, generator=g) * 60 + ci * 60).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / c / f"{k}.png")
    s = build_stream("image_folder", path=str(tmp_path / "imgs"), n_experiences=2, image_size=[8, 8])
    assert s.input_kind == "image" and s.class_names == ["circle", "square", "star", "triangle"]
    x = s.experiences[0].train.x
    assert x.shape == (12, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert [len(e.test) for e in s.experiences] == [4, 4]
    rgb = build_stream("image_folder", path=str(tmp_path / "imgs" / "train"), mode="RGB", n_experiences=4)
    assert rgb.experiences[0].train.x.shape[1:] == (3, 28, 28) and [len(e.test) for e in rgb.experiences] == [1] * 4


def test_avalanche_benchmark_becomes_a_stream():
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)

    def ds(n):
        y = torch.arange(n) % 4
        d = TensorDataset(torch.rand(n, 1, 4, 4, generator=g), y)
        d.targets = y.tolist()
        return d

    bm = nc_benchmark(ds(40), ds(20), n_experiences=2, task_labels=False, seed=0)
    s = from_avalanche(bm)
    assert len(s) == 2 and s.input_kind == "image" and s.num_classes == 4
    for e, av in zip(s.experiences, bm.train_stream):
        assert e.classes == sorted(av.classes_in_this_experience) and len(e.train) == 20 and len(e.test) == 10
        assert set(e.train.y.tolist()) == set(e.classes)


def test_huggingface_dataset_from_disk(tmp_path, table):
    datasets = pytest.importorskip("datasets")
    df = pd.DataFrame(_rows())
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(df[df.part == "train"], preserve_index=False),
                               "test": datasets.Dataset.from_pandas(df[df.part == "test"], preserve_index=False)})
    dd.save_to_disk(str(tmp_path / "hf"))
    s = build_stream("huggingface", path=str(tmp_path / "hf"), n_experiences=2, **_cols())
    assert s.class_names == sorted(CLASSES) and [len(e.test) for e in s.experiences] == [9, 9]
    # integer ClassLabel columns come back as their names
    dd.class_encode_column("intent").save_to_disk(str(tmp_path / "hf_int"))
    ints = build_stream("huggingface", path=str(tmp_path / "hf_int"), n_experiences=2, **_cols())
    assert ints.class_names == sorted(CLASSES)
    assert torch.equal(ints.experiences[1].test.x, s.experiences[1].test.x)


def test_a_files_task_runs_through_the_runner(table, tmp_path):
    """A real run on the file, the task's `name` kept, experiences named in full in results.json."""
    run_dir = tmp_path / "run"
    cfg = validate(compose([
        f"run_dir={run_dir}", "task=files", f"task.path={table / 'data.csv'}", "task.text_column=utterance",
        "task.label_column=intent", "task.n_experiences=2", "task.name=my_intents", "task.max_len=32",
        "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "trainer.epochs=3", "optim.lr=3e-3",
        "trainer.batch_size=8", "trainer.progress_bar=false", "logger=csv"]))
    results = run(cfg)
    assert results["status"] == "finished" and len(results["accuracy_matrix"]) == 3
    assert [e["name"] for e in results["experiences"]] == [f"{LONG}+billing+cancel", "delivery+exchange+feedback"]
    assert results["stream"] == "my_intents" and results["class_names"] == sorted(CLASSES)
