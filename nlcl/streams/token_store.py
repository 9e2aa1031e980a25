"""Built language-modelling streams kept as token files on disk, tokenised once and opened lazily.

`task.token_dir=<folder>` (or `nlcl tokenize`) saves a stream the first time its settings are seen:
every split of every experience becomes two token files of fixed-width rows (inputs, and targets
with -100 where there is no loss), written chunk by chunk through `write_token_file`, plus the
scorer's own datasets (e.g. the ranked candidates of the knowledge stream) the same way, and a
`stream.json` manifest with the stream's fields. Later runs with the same task settings open that
folder instead of building the stream: every dataset is a `TokenRows`, read row by row with
`pread`, so training holds none of the corpus in memory. The rows are the in-memory rows, value
for value, so a run trains and scores exactly as it would on the in-memory stream.

The folder is `<token_dir>/<stream>-<hash of the task settings>`: changing any task setting makes a
new one; delete a folder to tokenise again (e.g. after the source data changed). A folder is written
under a temporary name and renamed when complete, so a half-written one is never opened.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from nlcl import distributed as D

from . import scoring
from .base import Experience, StreamError, TaskStream
from .scoring import IGNORE
from .token_files import TokenRows, write_token_file

STORE_FORMAT = "nlcl-token-stream-1"
MANIFEST = "stream.json"
# tokens converted and written at a time (8 MiB as int64): the writer never copies a whole split, and
# its buffers stay small whatever the row length
CHUNK_TOKENS = 1 << 20
# the stream's plain fields, saved and restored as they are
STREAM_FIELDS = ("name", "num_classes", "input_kind", "vocab_size", "pad_id", "class_names", "scenario",
                 "objective", "metric_name", "higher_is_better")


def store_key(task_options: dict) -> str:
    """The folder name of a task's stored stream: its stream name and a hash of every setting."""
    text = json.dumps({"format": STORE_FORMAT, **task_options}, sort_keys=True, default=str)
    name = str(task_options.get("stream") or "stream")
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _row_chunks(dataset):
    """(x rows, y rows) of a dataset, about CHUNK_TOKENS tokens at a time, from tensors or from a lazy
    `slice`."""
    lazy = hasattr(dataset, "slice")
    row_len = int((dataset.slice(0, 1)[0] if lazy else dataset.x).shape[-1]) if len(dataset) else 1
    rows = max(1, CHUNK_TOKENS // max(row_len, 1))
    for start in range(0, len(dataset), rows):
        if lazy:
            yield dataset.slice(start, start + rows)
        else:
            yield dataset.x[start:start + rows], dataset.y[start:start + rows]


def save_rows(dataset, directory: Path, stem: str, vocab_size: int, pad_id: int) -> dict:
    """Write a dataset of (x [L], y [L]) token rows as `<stem>.x.bin` and `<stem>.y.bin`; returns
    its manifest entry (file names, row width, rows, longest unpadded input)."""
    first_x, first_y = next(_row_chunks(dataset))
    if first_x.dim() != 2 or first_x.is_floating_point() or first_y.shape != first_x.shape:
        raise StreamError(f"token_dir: '{stem}' is not a set of token rows with aligned targets "
                          f"(inputs {tuple(first_x.shape)}, targets {tuple(first_y.shape)})")
    row_len = int(first_x.shape[1])
    longest = 0

    def xs():
        nonlocal longest
        for x, _ in _row_chunks(dataset):
            if x.shape[1] != row_len:
                raise StreamError(f"token_dir: '{stem}' has rows of {x.shape[1]} and {row_len} tokens")
            real = (x != pad_id).any(0).nonzero()
            longest = max(longest, int(real.max()) + 1 if len(real) else 0)
            yield x.numpy().reshape(-1)

    def ys():
        for _, y in _row_chunks(dataset):
            yield y.numpy().reshape(-1)

    write_token_file(directory / f"{stem}.x.bin", xs(), vocab_size, pad_id)
    write_token_file(directory / f"{stem}.y.bin", ys(), vocab_size, pad_id, ignore_index=IGNORE)
    return {"x": f"{stem}.x.bin", "y": f"{stem}.y.bin", "row_len": row_len, "rows": len(dataset), "longest": longest}


def open_rows(directory: Path, entry: dict) -> TokenRows:
    rows = TokenRows(directory / entry["x"], directory / entry["y"], int(entry["row_len"]), entry.get("longest"))
    if len(rows) != entry["rows"]:
        raise StreamError(f"token_dir '{directory}': {entry['x']} holds {len(rows)} rows, its manifest says {entry['rows']}")
    return rows


def _scorer_entry(scorer, directory: Path, vocab_size: int, pad_id: int) -> dict:
    """The scorer as its class name in nlcl.streams.scoring and its fields; datasets it holds are saved
    as token rows (never pickled: opening a folder runs no stored code)."""
    cls = type(scorer)
    if getattr(scoring, cls.__name__, None) is not cls:
        raise StreamError(f"token_dir: the stream's scorer {cls.__module__}.{cls.__name__} is not one of "
                          "nlcl.streams.scoring's scorers, so it cannot be stored; run without task.token_dir")
    fields = {}
    for name, value in vars(scorer).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            fields[name] = value
        elif isinstance(value, dict) and all(hasattr(v, "__getitem__") and hasattr(v, "__len__") for v in value.values()):
            fields[name] = {"datasets": [[key, save_rows(ds, directory, f"scorer_{name}_{key}", vocab_size, pad_id)]
                                         for key, ds in value.items()]}
        else:
            raise StreamError(f"token_dir: scorer field {cls.__name__}.{name} ({type(value).__name__}) cannot be stored")
    return {"class": cls.__name__, "fields": fields}


def _open_scorer(entry: dict | None, directory: Path):
    if entry is None:
        return None
    cls = getattr(scoring, entry["class"], None)
    if not isinstance(cls, type) or not issubclass(cls, scoring._Scorer):
        raise StreamError(f"token_dir '{directory}': unknown scorer {entry['class']!r} in {MANIFEST}")
    scorer = cls.__new__(cls)
    for name, value in entry["fields"].items():
        if isinstance(value, dict) and "datasets" in value:
            value = {key: open_rows(directory, rows) for key, rows in value["datasets"]}
        setattr(scorer, name, value)
    return scorer


def save_stream(stream: TaskStream, directory: str | Path) -> Path:
    """Write `stream` (a language-modelling token stream) into `directory`; the manifest goes last."""
    directory = Path(directory)
    if stream.objective != "lm" or stream.input_kind != "tokens":
        raise StreamError(f"token_dir: stream '{stream.name}' is a {stream.objective} stream of {stream.input_kind}; "
                          "token files hold language-modelling token streams (lm_domains, knowledge, synthetic "
                          "tasks, token_files)")
    directory.mkdir(parents=True, exist_ok=True)
    vocab, pad = int(stream.vocab_size), int(stream.pad_id)
    experiences = []
    for e in stream.experiences:
        splits = {split: save_rows(getattr(e, split), directory, f"e{e.index}_{split}", vocab, pad)
                  for split in ("train", "test", "val") if getattr(e, split, None) is not None}
        experiences.append({"index": e.index, "name": e.name, "classes": list(e.classes), "task_label": e.task_label,
                            "splits": splits})
    manifest = {"format": STORE_FORMAT, "stream": {f: getattr(stream, f) for f in STREAM_FIELDS},
                "scorer": None if stream.scorer is None else _scorer_entry(stream.scorer, directory, vocab, pad),
                "experiences": experiences}
    tmp = directory / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, directory / MANIFEST)
    return directory


def open_stream(directory: str | Path) -> TaskStream:
    """The stream saved in `directory`, every dataset read lazily from its token files."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise StreamError(f"token_dir '{directory}': no {MANIFEST} (not a stored stream, or an unfinished write)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != STORE_FORMAT:
        raise StreamError(f"token_dir '{directory}': format {manifest.get('format')!r}, expected {STORE_FORMAT!r}")
    experiences = []
    for e in manifest["experiences"]:
        sets = {split: open_rows(directory, entry) for split, entry in e["splits"].items()}
        experiences.append(Experience(index=e["index"], name=e["name"], classes=e["classes"],
                                      task_label=e["task_label"], **sets))
    stream = TaskStream(experiences=experiences, scorer=_open_scorer(manifest["scorer"], directory),
                        **manifest["stream"])
    return stream.validate()


def stored_stream(task_options: dict, token_dir: str | Path, build: Callable[[], TaskStream]) -> TaskStream:
    """The task's stream from `token_dir`: opened when stored, else built once by `build`, saved, and
    opened from disk (so the first run already trains from the files). Under several processes rank 0
    builds and writes; the others wait and open what it wrote."""
    final = Path(token_dir).expanduser() / store_key(task_options)
    error = None
    if D.is_rank_zero() and not (final / MANIFEST).is_file():
        try:
            _build_and_save(build, final)
        except Exception as exc:  # every rank must hear of it, not wait forever
            error = exc
    message = D.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise StreamError(f"token_dir: rank 0 could not tokenise the stream: {message}")
    return open_stream(final)


def _build_and_save(build: Callable[[], TaskStream], final: Path) -> None:
    stream = build()
    tmp = final.with_name(f"{final.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_stream(stream, tmp)
        del stream
        try:
            os.rename(tmp, final)  # atomic; fails when another run renamed its copy first
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def folder_size(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
