"""Streams from other libraries' data objects: Hugging Face `datasets` and avalanche-lib benchmarks.

- `hf_stream`: a text classification data set saved with `save_to_disk`, or loadable by
  `datasets.load_dataset` from local files or the local cache (nothing is downloaded: it runs with
  HF_DATASETS_OFFLINE=1). Its rows then go through the same options as `task=files`.
- `from_avalanche(benchmark)`: every experience of an avalanche benchmark's train and test streams
  becomes an nlcl experience with the classes avalanche lists for it; `avalanche_stream` builds
  the benchmark from a config node (`benchmark: {_target_: ...}`) first.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import Experience, StreamError, TaskStream, TensorPairDataset
from .files import table_stream
from .tokenizers import Tokenizer


def _hf_frames(path: str, train_split: str, test_split: str, config_name: str | None):
    try:
        import datasets
    except ImportError:
        raise StreamError("task=huggingface needs the 'datasets' package: pip install datasets") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files and cache only
    local = Path(path).expanduser()
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(path, config_name)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this"
        raise StreamError(f"task.path: datasets could not load '{path}' locally ({type(e).__name__}: {e})") from None
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({train_split: ds})
    if train_split not in ds:
        raise StreamError(f"task.train_split: '{path}' has no split '{train_split}'; its splits: {list(ds)}")

    def frame(d):
        df = d.to_pandas()
        for col, feature in d.features.items():  # integer class labels -> their names
            if isinstance(feature, datasets.ClassLabel):
                df[col] = [feature.int2str(int(v)) for v in df[col]]
        return df

    return frame(ds[train_split]), (frame(ds[test_split]) if test_split in ds else None)


def hf_stream(path: str, config_name: str | None = None, train_split: str = "train", test_split: str = "test",
              text_column: str = "text", label_column: str = "label", experience_column: str | None = None,
              experiences=None, n_experiences: int | None = None, class_order: list | None = None,
              class_order_seed: int | None = None, test_fraction: float = 0.2, split_seed: int = 0,
              tokenizer: str | Tokenizer = "byte", max_len: int = 64, train_per_class: int | None = None,
              test_per_class: int | None = None, seed: int = 0, bpe_vocab_size: int = 2000,
              name: str = "huggingface") -> TaskStream:
    """A Hugging Face text classification data set as a stream; without a test split, a seeded split."""
    train, test = _hf_frames(path, train_split, test_split, config_name)
    return table_stream(train, test, source=path, text_column=text_column, label_column=label_column,
                        experience_column=experience_column, experiences=experiences, n_experiences=n_experiences,
                        class_order=class_order, class_order_seed=class_order_seed, test_fraction=test_fraction,
                        split_seed=split_seed, tokenizer=tokenizer, max_len=max_len,
                        train_per_class=train_per_class, test_per_class=test_per_class, seed=seed,
                        bpe_vocab_size=bpe_vocab_size, name=name)


def _tensors(dataset, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of an avalanche dataset as two tensors (its items are (x, y, task label, ...))."""
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=1024, shuffle=False):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise StreamError(f"{where}: items must be (x, y, ...) tuples")
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys).long()


def from_avalanche(benchmark, name: str = "avalanche", pad_id: int = 0) -> TaskStream:
    """An avalanche-lib benchmark (its `train_stream` and `test_stream`, experience by experience) as a
    TaskStream. Float inputs become an image stream, integer [N, L] inputs a token stream."""
    train_stream, test_stream = list(benchmark.train_stream), list(benchmark.test_stream)
    if len(train_stream) != len(test_stream):
        raise StreamError(f"avalanche benchmark: {len(train_stream)} train but {len(test_stream)} test experiences")
    experiences, all_classes = [], set()
    input_kind, vocab = None, 0
    for i, (tr, te) in enumerate(zip(train_stream, test_stream)):
        xtr, ytr = _tensors(tr.dataset, f"avalanche train experience {i}")
        xte, yte = _tensors(te.dataset, f"avalanche test experience {i}")
        classes = sorted(int(c) for c in getattr(tr, "classes_in_this_experience", None) or torch.unique(ytr).tolist())
        kind = "tokens" if not torch.is_floating_point(xtr) and xtr.dim() == 2 else "image"
        if input_kind not in (None, kind):
            raise StreamError(f"avalanche benchmark: experience {i} holds {kind} inputs, earlier ones {input_kind}")
        input_kind = kind
        if kind == "tokens":
            vocab = max(vocab, int(xtr.max()) + 1, int(xte.max()) + 1 if len(xte) else 0)
        else:
            xtr, xte = xtr.float(), xte.float()
        task_label = int(getattr(tr, "task_label", 0) or 0)
        experiences.append(Experience(index=i, name=f"experience-{i}", classes=classes, task_label=task_label,
                                      train=TensorPairDataset(xtr, ytr), test=TensorPairDataset(xte, yte)))
        all_classes.update(classes)
    n_classes = int(getattr(benchmark, "n_classes", 0) or 0) or max(all_classes) + 1
    disjoint = sum(len(e.classes) for e in experiences) == len(all_classes)
    stream = TaskStream(name=name, experiences=experiences, num_classes=n_classes, input_kind=input_kind,
                        vocab_size=vocab if input_kind == "tokens" else None, pad_id=pad_id,
                        class_names=[str(c) for c in range(n_classes)],
                        scenario="class_incremental" if disjoint else "domain_incremental")
    return stream.validate()


def avalanche_stream(benchmark: dict, name: str = "avalanche", pad_id: int = 0) -> TaskStream:
    """`task=avalanche task.benchmark._target_=<a function or class returning a benchmark> task.benchmark.<arg>=...`."""
    from hydra.utils import instantiate

    if not isinstance(benchmark, dict) or "_target_" not in benchmark:
        raise StreamError("task.benchmark: a mapping with _target_ (the function or class that builds the "
                          "avalanche benchmark) and its arguments")
    try:
        bm = instantiate(benchmark)
    except Exception as e:  # noqa: BLE001 - hydra wraps import and call errors
        raise StreamError(f"task.benchmark: could not build {benchmark['_target_']} ({e})") from None
    return from_avalanche(bm, name=name, pad_id=pad_id)
