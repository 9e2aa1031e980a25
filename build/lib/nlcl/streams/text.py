"""Class-incremental intent-classification streams: CLINC150 (10 domains) and Banking77.

Class ids are the dataset's canonical order (CLINC: `domains.json` flattened; Banking77:
`categories.json`), so an id names the same intent whatever the class order of the stream;
each experience lists the ids it introduces, and `TaskStream.classes_seen` gives the stream order.
"""
from __future__ import annotations

import csv
import json
from typing import Sequence

import torch

from .base import Experience, StreamError, TaskStream, TensorPairDataset
from .data_files import find_data_file, seeded_generator, subsample_per_class
from .tokenizers import Tokenizer, build_tokenizer

CLINC_URL = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/{}"
BANKING_URL = "https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/master/banking_data/{}"

_SUBSAMPLE_SALT, _CLASS_ORDER_SALT = 1, 2


def resolve_tokenizer(tokenizer: str | Tokenizer, train_texts: Sequence[str], bpe_vocab_size: int) -> Tokenizer:
    """A tokenizer object as is, or one built by name; `bpe` is trained on the stream's training texts."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer == "bpe":
        # all experiences' training texts: the tokenizer is fixed preprocessing, not a learner
        return build_tokenizer("bpe", texts=list(train_texts), vocab_size=bpe_vocab_size)
    return build_tokenizer(tokenizer)


def text_stream(name: str, train: tuple[list[str], torch.Tensor], test: tuple[list[str], torch.Tensor],
                groups: list[tuple[str, list[int]]], class_names: list[str], *, tokenizer: str | Tokenizer,
                max_len: int, train_per_class: int | None, test_per_class: int | None, seed: int,
                bpe_vocab_size: int) -> TaskStream:
    """Tokenize once, then cut the labelled texts into one experience per group of class ids."""
    splits = {}
    for split, (texts, labels), per_class in (("train", train, train_per_class), ("test", test, test_per_class)):
        keep = subsample_per_class(labels, per_class, seeded_generator(seed, _SUBSAMPLE_SALT + (split == "test")))
        splits[split] = ([texts[i] for i in keep.tolist()], labels[keep])

    tok = resolve_tokenizer(tokenizer, splits["train"][0], bpe_vocab_size)
    data = {split: TensorPairDataset(tok.encode_batch(texts, max_len), labels)
            for split, (texts, labels) in splits.items()}

    experiences = []
    for index, (group_name, classes) in enumerate(groups):
        wanted = torch.tensor(classes)
        experiences.append(Experience(
            index=index, name=group_name, classes=list(classes),
            train=data["train"].subset(torch.isin(data["train"].y, wanted).nonzero().squeeze(1)),
            test=data["test"].subset(torch.isin(data["test"].y, wanted).nonzero().squeeze(1)),
        ))
    stream = TaskStream(name=name, experiences=experiences, num_classes=len(class_names), input_kind="tokens",
                        vocab_size=tok.vocab_size, pad_id=tok.pad_id, class_names=list(class_names))
    return stream.validate()


def _labelled(pairs: list[tuple[str, str]], class_id: dict[str, int], source: str) -> tuple[list[str], torch.Tensor]:
    unknown = sorted({label for _, label in pairs if label not in class_id})
    if unknown:
        raise StreamError(f"{source}: labels {unknown[:5]} are not among the known intents")
    return [text for text, _ in pairs], torch.tensor([class_id[label] for _, label in pairs], dtype=torch.long)


# -- CLINC150 ----------------------------------------------------------------------------------

def load_clinc150(data_dir=None) -> tuple[dict[str, list[str]], dict[str, list[tuple[str, str]]]]:
    """(domains: domain -> its 15 intents in file order, splits: name -> [(text, intent)])."""
    paths = {f: find_data_file("clinc150", f, CLINC_URL.format(f), data_dir) for f in ("domains.json", "data_full.json")}
    with open(paths["domains.json"]) as fh:
        domains = json.load(fh)
    with open(paths["data_full.json"]) as fh:
        splits = {k: [tuple(p) for p in v] for k, v in json.load(fh).items()}
    return domains, splits


def clinc150_stream(tokenizer: str | Tokenizer = "byte", max_len: int = 64, train_per_class: int | None = None,
                    test_per_class: int | None = None, seed: int = 0, data_dir=None,
                    bpe_vocab_size: int = 2000) -> TaskStream:
    """10 experiences, one per domain in `domains.json` order, 15 intents each; in-scope train/test (oos dropped)."""
    domains, splits = load_clinc150(data_dir)
    class_names = [intent for intents in domains.values() for intent in intents]
    class_id = {intent: i for i, intent in enumerate(class_names)}
    if len(class_id) != len(class_names):
        raise StreamError("clinc150: domains.json lists an intent twice")
    groups = [(domain, [class_id[i] for i in intents]) for domain, intents in domains.items()]
    return text_stream(
        "clinc150", _labelled(splits["train"], class_id, "clinc150 train"),
        _labelled(splits["test"], class_id, "clinc150 test"), groups, class_names,
        tokenizer=tokenizer, max_len=max_len, train_per_class=train_per_class, test_per_class=test_per_class,
        seed=seed, bpe_vocab_size=bpe_vocab_size)


# -- Banking77 ---------------------------------------------------------------------------------

def load_banking77(data_dir=None) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """(the 77 categories in file order, splits: train/test -> [(text, category)])."""
    files = ("categories.json", "train.csv", "test.csv")
    paths = {f: find_data_file("banking77", f, BANKING_URL.format(f), data_dir) for f in files}
    with open(paths["categories.json"]) as fh:
        categories = json.load(fh)
    splits = {}
    for split in ("train", "test"):
        with open(paths[f"{split}.csv"], newline="") as fh:
            splits[split] = [(row["text"], row["category"]) for row in csv.DictReader(fh)]
    return categories, splits


def banking77_stream(tokenizer: str | Tokenizer = "byte", max_len: int = 64, train_per_class: int | None = None,
                     test_per_class: int | None = None, seed: int = 0, data_dir=None, n_experiences: int = 7,
                     class_order_seed: int = 0, bpe_vocab_size: int = 2000) -> TaskStream:
    """`n_experiences` experiences (7 x 11 by default) over a seeded permutation of the 77 categories."""
    categories, splits = load_banking77(data_dir)
    if not 1 <= n_experiences <= len(categories):
        raise StreamError(f"banking77: n_experiences must be in 1..{len(categories)}, got {n_experiences}")
    class_id = {c: i for i, c in enumerate(categories)}
    order = torch.randperm(len(categories), generator=seeded_generator(class_order_seed, _CLASS_ORDER_SALT))
    groups = [(f"banking-{i}", chunk.tolist()) for i, chunk in enumerate(torch.tensor_split(order, n_experiences))]
    return text_stream(
        "banking77", _labelled(splits["train"], class_id, "banking77 train"),
        _labelled(splits["test"], class_id, "banking77 test"), groups, list(categories),
        tokenizer=tokenizer, max_len=max_len, train_per_class=train_per_class, test_per_class=test_per_class,
        seed=seed, bpe_vocab_size=bpe_vocab_size)
