"""Streams from a user's own files: labelled tables (CSV, TSV, JSON lines, Parquet) and image folders.

No code needed: `nlcl run task=files task.path=my.csv task.n_experiences=5`. The pieces:

- the rows: a table with a text column and a label column (any names), or a folder with one
  sub-folder of images per class;
- train/test: a second file or folder (`test_path`), a column saying "train"/"test"
  (`split_column`), or else a seeded split of `test_fraction` of every class;
- experiences: by a column (`experience_column`, in order of first appearance), by explicit lists
  of class names (`experiences`), or `n_experiences` equal groups of a class order (`class_order`,
  else the sorted class names, shuffled when `class_order_seed` is set).

Class ids follow the sorted class names, so an id names the same class whatever the experience
order; class and experience names are kept in full.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .base import Experience, StreamError, TaskStream, TensorPairDataset
from .data_files import seeded_generator, subsample_per_class
from .tokenizers import Tokenizer

TABLE_FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_SPLIT_SALT, _SUBSAMPLE_SALT, _CLASS_ORDER_SALT = 11, 12, 13


@dataclass
class Rows:
    """One split before encoding: inputs (texts or image paths), label names, experience values."""

    inputs: list
    labels: list[str]
    groups: list[str] | None = None

    def take(self, index: Sequence[int]) -> "Rows":
        return Rows([self.inputs[i] for i in index], [self.labels[i] for i in index],
                    None if self.groups is None else [self.groups[i] for i in index])


# -- reading --------------------------------------------------------------------------------------

def table_format(path: Path, format: str | None) -> str:
    fmt = (format or path.suffix.lstrip(".")).lower()
    fmt = {"ndjson": "jsonl", "pq": "parquet", "txt": "tsv"}.get(fmt, fmt)
    if fmt not in TABLE_FORMATS:
        raise StreamError(f"task.format: cannot tell the format of {path} ('{fmt}'); set task.format to one of "
                          f"{TABLE_FORMATS}")
    return fmt


def read_table(path: str | Path, format: str | None = None):
    """A pandas DataFrame of every row; labels and texts are read as written (no type guessing)."""
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise StreamError(f"task.path: no file at {path}")
    fmt = table_format(path, format)
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False)
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if fmt == "json":
            return pd.read_json(path, dtype=False)
        return pd.read_parquet(path)
    except ImportError as e:  # parquet without pyarrow
        raise StreamError(f"{path}: reading {fmt} needs a library that is not installed ({e})") from None
    except ValueError as e:
        raise StreamError(f"{path}: not a readable {fmt} table ({e})") from None


def table_rows(df, source: str, text_column: str, label_column: str, experience_column: str | None) -> Rows:
    """Rows from a DataFrame, naming the missing column and the ones present."""
    for field, col in (("text_column", text_column), ("label_column", label_column),
                       ("experience_column", experience_column)):
        if col is not None and col not in df.columns:
            raise StreamError(f"task.{field}: {source} has no column '{col}'; its columns: {list(df.columns)}")
    if len(df) == 0:
        raise StreamError(f"{source}: the table has no rows")
    texts = df[text_column].astype(str).tolist()
    labels = df[label_column].astype(str).tolist()
    groups = None if experience_column is None else df[experience_column].astype(str).tolist()
    return Rows(texts, labels, groups)


def image_rows(root: Path, field: str = "path") -> Rows:
    """One class per sub-folder of `root` (its name is the class name), every image file inside it."""
    if not root.is_dir():
        raise StreamError(f"task.{field}: no folder at {root}")
    paths, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                labels.append(class_dir.name)
    if not paths:
        raise StreamError(f"task.{field}: {root} holds no class folders with images ({', '.join(IMAGE_SUFFIXES)})")
    return Rows(paths, labels)


# -- train/test -----------------------------------------------------------------------------------

def by_split_column(rows: Rows, values: list[str], train_split: str, test_split: str,
                    split_column: str) -> tuple[Rows, Rows]:
    train = [i for i, v in enumerate(values) if v == train_split]
    test = [i for i, v in enumerate(values) if v == test_split]
    if not train or not test:
        raise StreamError(f"task.split_column: column '{split_column}' needs rows marked '{train_split}' and "
                          f"'{test_split}'; it holds {sorted(set(values))[:10]}")
    return rows.take(train), rows.take(test)


def seeded_split(rows: Rows, test_fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Per class (and experience, when a column defines them), a seeded `test_fraction` of the rows
    (at least one) goes to test, the rest to train."""
    if not 0 < test_fraction < 1:
        raise StreamError(f"task.test_fraction: must be in (0, 1), got {test_fraction}")
    g = seeded_generator(seed, _SPLIT_SALT)
    keys = list(zip(rows.labels, rows.groups or [""] * len(rows.labels)))
    train, test = [], []
    for key in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == key]
        if len(idx) < 2:
            where = f"class '{key[0]}'" + (f" in experience '{key[1]}'" if key[1] else "")
            raise StreamError(f"task.test_fraction: {where} has {len(idx)} row; a seeded split needs at "
                              "least 2 (or give task.test_path / task.split_column)")
        perm = torch.randperm(len(idx), generator=g).tolist()
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        test += [idx[p] for p in perm[:n_test]]
        train += [idx[p] for p in perm[n_test:]]
    return rows.take(sorted(train)), rows.take(sorted(test))


# -- experiences ----------------------------------------------------------------------------------

def _group_name(classes: list[str]) -> str:
    return "+".join(classes)


def class_groups(class_names: list[str], experiences, n_experiences: int | None, class_order: list | None,
                 class_order_seed: int | None) -> list[tuple[str, list[str]]]:
    """(experience name, its class names) in stream order, from explicit lists or N equal groups."""
    known = set(class_names)
    if experiences is not None:
        items = list(experiences.items()) if isinstance(experiences, dict) else [
            (None, list(v)) for v in experiences]
        groups = []
        for key, classes in items:
            classes = [str(c) for c in classes]
            unknown = [c for c in classes if c not in known]
            if unknown:
                raise StreamError(f"task.experiences: classes {unknown[:5]} are not in the data; its classes: "
                                  f"{class_names[:20]}")
            groups.append((str(key) if key is not None else _group_name(classes), classes))
        return groups
    if n_experiences is None:
        raise StreamError("task: say how to cut the data into experiences: task.n_experiences (equal class "
                          "groups), task.experiences (lists of class names) or task.experience_column")
    if class_order is not None:
        order = [str(c) for c in class_order]
        missing, unknown = sorted(known - set(order)), [c for c in order if c not in known]
        if unknown or missing or len(set(order)) != len(order):
            raise StreamError(f"task.class_order: must list every class once; unknown {unknown[:5]}, "
                              f"missing {missing[:5]}")
    else:
        order = sorted(known)
        if class_order_seed is not None:
            perm = torch.randperm(len(order), generator=seeded_generator(class_order_seed, _CLASS_ORDER_SALT))
            order = [order[i] for i in perm.tolist()]
    if not 1 <= n_experiences <= len(order):
        raise StreamError(f"task.n_experiences: must be in 1..{len(order)} (the number of classes), got {n_experiences}")
    chunks = torch.tensor_split(torch.arange(len(order)), n_experiences)
    return [(_group_name(names), names) for names in ([order[i] for i in c.tolist()] for c in chunks)]


def assemble(name: str, train: Rows, test: Rows, encode: Callable[[list, str], torch.Tensor], *, input_kind: str,
             experiences=None, n_experiences: int | None = None, class_order: list | None = None,
             class_order_seed: int | None = None, train_per_class: int | None = None,
             test_per_class: int | None = None, seed: int = 0, vocab_size: int | None = None,
             pad_id: int = 0, encode_ready: Callable[[Rows], None] | None = None) -> TaskStream:
    """Labelled rows -> a validated TaskStream; `encode(inputs, split)` turns a split's inputs into a tensor."""
    by_column = train.groups is not None
    unseen = sorted(set(test.labels) - set(train.labels))
    if unseen:
        raise StreamError(f"stream '{name}': test labels {unseen[:5]} never occur in the training data")
    if by_column:
        if experiences is not None or n_experiences is not None:
            raise StreamError("task.experience_column: give either it or task.experiences / task.n_experiences")
        order = list(dict.fromkeys(train.groups))  # first appearance
        members = {g: sorted({label for label, gg in zip(train.labels, train.groups) if gg == g}) for g in order}
        groups = [(g, members[g]) for g in order]
    else:
        groups = class_groups(sorted(set(train.labels)), experiences, n_experiences, class_order, class_order_seed)

    class_names = sorted({c for _, classes in groups for c in classes})
    class_id = {c: i for i, c in enumerate(class_names)}
    owners: dict[str, list[str]] = {}
    for g, classes in groups:
        for c in classes:
            owners.setdefault(c, []).append(g)
    disjoint = all(len(v) == 1 for v in owners.values())

    # test rows of a column-defined stream need the column unless every class has one experience
    if by_column and test.groups is None:
        if not disjoint:
            raise StreamError("task.experience_column: the test data has no such column and classes occur in "
                              "several experiences, so test rows cannot be assigned")
        test = Rows(test.inputs, test.labels, [owners[label][0] if label in owners else "" for label in test.labels])

    splits = {}
    for k, (split, rows, per_class) in enumerate((("train", train, train_per_class), ("test", test, test_per_class))):
        keep = [i for i, label in enumerate(rows.labels) if label in class_id]  # classes no experience lists: left out
        rows = rows.take(keep)
        y = torch.tensor([class_id[label] for label in rows.labels], dtype=torch.long)
        if by_column:  # per class and experience: subsample each (class, experience) cell
            cell = {c: i for i, c in enumerate(dict.fromkeys(zip(rows.labels, rows.groups)))}
            key = torch.tensor([cell[c] for c in zip(rows.labels, rows.groups)], dtype=torch.long)
        else:
            key = y
        pick = subsample_per_class(key, per_class, seeded_generator(seed, _SUBSAMPLE_SALT + k)).tolist()
        splits[split] = (rows.take(pick), y[pick])
    if encode_ready is not None:
        encode_ready(splits["train"][0])
    data = {split: TensorPairDataset(encode(rows.inputs, split), y) for split, (rows, y) in splits.items()}

    exps = []
    for index, (g, classes) in enumerate(groups):
        ids = torch.tensor([class_id[c] for c in classes])
        sets = {}
        for split, (rows, y) in splits.items():
            if by_column:
                mask = torch.tensor([gg == g for gg in rows.groups], dtype=torch.bool)
            else:
                mask = torch.isin(y, ids)
            sets[split] = data[split].subset(mask.nonzero().squeeze(1))
        exps.append(Experience(index=index, name=g, classes=ids.tolist(), train=sets["train"], test=sets["test"],
                               task_label=index if not disjoint else 0))
    stream = TaskStream(name=name, experiences=exps, num_classes=len(class_names), input_kind=input_kind,
                        vocab_size=vocab_size, pad_id=pad_id, class_names=class_names,
                        scenario="class_incremental" if disjoint else "domain_incremental")
    return stream.validate()


def split_rows(rows: Rows, test_rows: Rows | None, split_values: list[str] | None, *, split_column: str | None,
               train_split: str, test_split: str, test_fraction: float, split_seed: int) -> tuple[Rows, Rows]:
    if test_rows is not None:
        if split_column is not None:
            raise StreamError("task.split_column: give either it or task.test_path, not both")
        return rows, test_rows
    if split_values is not None:
        return by_split_column(rows, split_values, train_split, test_split, split_column)
    return seeded_split(rows, test_fraction, split_seed)


# -- the two streams ------------------------------------------------------------------------------

def table_stream(df, test_df=None, *, source: str = "table", text_column: str = "text", label_column: str = "label",
                 split_column: str | None = None, train_split: str = "train", test_split: str = "test",
                 experience_column: str | None = None, experiences=None, n_experiences: int | None = None,
                 class_order: list | None = None, class_order_seed: int | None = None, test_fraction: float = 0.2,
                 split_seed: int = 0, tokenizer: str | Tokenizer = "byte", max_len: int = 64,
                 train_per_class: int | None = None, test_per_class: int | None = None, seed: int = 0,
                 bpe_vocab_size: int = 2000, name: str = "files") -> TaskStream:
    """A text classification stream from pandas DataFrames (one, or train and test)."""
    from .text import resolve_tokenizer

    rows = table_rows(df, source, text_column, label_column, experience_column)
    test_rows = None
    if test_df is not None:
        has_group = experience_column is not None and experience_column in test_df.columns
        test_rows = table_rows(test_df, f"{source} (test)", text_column, label_column,
                               experience_column if has_group else None)
    split_values = None
    if split_column is not None and test_df is None:
        if split_column not in df.columns:
            raise StreamError(f"task.split_column: {source} has no column '{split_column}'; its columns: {list(df.columns)}")
        split_values = df[split_column].astype(str).tolist()
    train, test = split_rows(rows, test_rows, split_values, split_column=split_column, train_split=train_split,
                             test_split=test_split, test_fraction=test_fraction, split_seed=split_seed)
    tok: dict[str, Tokenizer] = {}

    def fit(train_rows: Rows) -> None:  # bpe learns from the training texts only
        tok["t"] = resolve_tokenizer(tokenizer, train_rows.inputs, bpe_vocab_size)

    def encode(texts, split):
        return tok["t"].encode_batch(list(texts), max_len)

    # the tokenizer's vocabulary size is known once it is fitted: assemble first, then fill it in
    stream = assemble(name, train, test, encode, input_kind="tokens", experiences=experiences,
                      n_experiences=n_experiences, class_order=class_order, class_order_seed=class_order_seed,
                      train_per_class=train_per_class, test_per_class=test_per_class, seed=seed,
                      encode_ready=fit)
    stream.vocab_size, stream.pad_id = tok["t"].vocab_size, tok["t"].pad_id
    return stream


def files_stream(path: str, test_path: str | None = None, format: str | None = None, text_column: str = "text",
                 label_column: str = "label", split_column: str | None = None, train_split: str = "train",
                 test_split: str = "test", experience_column: str | None = None, experiences=None,
                 n_experiences: int | None = None, class_order: list | None = None,
                 class_order_seed: int | None = None, test_fraction: float = 0.2, split_seed: int = 0,
                 tokenizer: str | Tokenizer = "byte", max_len: int = 64, train_per_class: int | None = None,
                 test_per_class: int | None = None, seed: int = 0, bpe_vocab_size: int = 2000,
                 name: str = "files") -> TaskStream:
    """Text classification from a CSV / TSV / JSON-lines / Parquet file (see the module docstring)."""
    df = read_table(path, format)
    test_df = None if test_path is None else read_table(test_path, format)
    return table_stream(df, test_df, source=str(path), text_column=text_column, label_column=label_column,
                        split_column=split_column, train_split=train_split, test_split=test_split,
                        experience_column=experience_column, experiences=experiences, n_experiences=n_experiences,
                        class_order=class_order, class_order_seed=class_order_seed, test_fraction=test_fraction,
                        split_seed=split_seed, tokenizer=tokenizer, max_len=max_len, train_per_class=train_per_class,
                        test_per_class=test_per_class, seed=seed, bpe_vocab_size=bpe_vocab_size, name=name)


def load_images(paths: list, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Float images [N, C, H, W] in [0, 1], each converted to `mode` and resized to `size` (H, W)."""
    import numpy as np
    from PIL import Image

    if not paths:
        return torch.zeros(0, 1 if mode == "L" else 3, *size)
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert(mode).resize((size[1], size[0])), dtype=np.uint8))
        except OSError as e:
            raise StreamError(f"{p}: not a readable image ({e})") from None
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def image_folder_stream(path: str, test_path: str | None = None, image_size: list | None = None, mode: str = "L",
                        experiences=None, n_experiences: int | None = None, class_order: list | None = None,
                        class_order_seed: int | None = None, test_fraction: float = 0.2, split_seed: int = 0,
                        train_per_class: int | None = None, test_per_class: int | None = None, seed: int = 0,
                        name: str = "image_folder") -> TaskStream:
    """Image classification from `path/<class>/*.png` (and `test_path/<class>/...`, or `path/train` and
    `path/test`, or a seeded split). Images become float tensors [C, H, W] of `image_size` (default 28x28)."""
    if mode not in ("L", "RGB"):
        raise StreamError(f"task.mode: 'L' (grey) or 'RGB', got {mode!r}")
    size = tuple(int(s) for s in (image_size or (28, 28)))
    if len(size) != 2 or min(size) < 1:
        raise StreamError(f"task.image_size: [height, width] of positive integers, got {image_size}")
    root = Path(path).expanduser()
    if test_path is None and (root / "train").is_dir() and (root / "test").is_dir():
        root, test_path = root / "train", root / "test"
    rows = image_rows(root)
    test_rows = None if test_path is None else image_rows(Path(test_path).expanduser(), "test_path")
    train, test = split_rows(rows, test_rows, None, split_column=None, train_split="train", test_split="test",
                             test_fraction=test_fraction, split_seed=split_seed)
    return assemble(name, train, test, lambda paths, split: load_images(paths, size, mode), input_kind="image",
                    experiences=experiences, n_experiences=n_experiences, class_order=class_order,
                    class_order_seed=class_order_seed, train_per_class=train_per_class,
                    test_per_class=test_per_class, seed=seed)
