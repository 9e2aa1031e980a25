"""Finding the real data files: environment override, the shared data folder, the user cache, download.

Nothing here runs at import time; a download happens only when a loader asks for a missing file
and knows its upstream URL.
"""
from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

import torch

from .base import StreamError

ENV_VAR = "NLCL_DATA"
DOWNLOAD_TIMEOUT_S = 20.0
REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder above the `nlcl` package


def shared_data_roots() -> list[Path]:
    """`../shared/data` seen from the working directory and from the repository root."""
    roots = [Path.cwd() / ".." / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    unique: list[Path] = []
    for r in roots:
        r = r.resolve()
        if r not in unique:
            unique.append(r)
    return unique


def cache_root() -> Path:
    return Path.home() / ".cache" / "nlcl"


def candidate_paths(dataset: str, filename: str) -> list[Path]:
    """Every place searched, in order."""
    places: list[Path] = []
    if os.environ.get(ENV_VAR):
        places.append(Path(os.environ[ENV_VAR]).expanduser() / dataset / filename)
    places += [root / dataset / filename for root in shared_data_roots()]
    places.append(cache_root() / dataset / filename)
    return places


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest` atomically: a killed download never leaves a half-written file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def find_data_file(dataset: str, filename: str, url: str | None = None,
                   data_dir: str | Path | None = None) -> Path:
    """Path of `<dataset>/<filename>`, downloading it into the user cache if `url` is given.

    With `data_dir`, that folder (holding `filename` directly) is the only place looked at.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser() / filename
        if path.is_file():
            return path
        raise StreamError(f"data file '{filename}' of '{dataset}' not found in data_dir={str(data_dir)!r} "
                          f"(looked for {path})")

    places = candidate_paths(dataset, filename)
    for path in places:
        if path.is_file():
            return path

    failure = "no download URL known"
    if url:
        dest = cache_root() / dataset / filename
        try:
            _download(url, dest)
            return dest
        except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
            failure = f"download from {url} failed: {err}"

    searched = "\n".join(f"  - {p}" for p in places)
    hint = f"\nUpstream: {url}" if url else ""
    raise StreamError(
        f"data file '{dataset}/{filename}' is missing ({failure}). Searched:\n{searched}\n"
        f"Put the file at ${ENV_VAR}/{dataset}/{filename}, at ../shared/data/{dataset}/{filename} "
        f"beside the repository, or at {cache_root() / dataset / filename}.{hint}")


# -- selecting data reproducibly (shared by the text and vision loaders) --------------------------

def seeded_generator(seed: int, salt: int = 0) -> torch.Generator:
    """A torch Generator per (seed, purpose), so that e.g. subsampling never shifts a class order."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)


def subsample_per_class(labels: torch.Tensor, per_class: int | None, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices keeping at most `per_class` random examples of every label (all when None)."""
    if per_class is None:
        return torch.arange(len(labels))
    if per_class < 1:
        raise StreamError(f"per-class sample size must be >= 1 or None, got {per_class}")
    # one random key per example, then rank inside each class: no loop over classes
    keys = torch.rand(len(labels), generator=generator)
    order = torch.argsort(keys)
    order = order[torch.argsort(labels[order], stable=True)]  # grouped by label, random inside a group
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.arange(len(labels)) - starts
    return torch.sort(order[rank < per_class]).values
