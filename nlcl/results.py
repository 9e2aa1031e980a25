"""The results store: one folder per run, written atomically, read without executing code.

Layout of a run folder:
    config.yaml              resolved configuration
    results.json             accuracy matrices, metrics, experiences, timings, versions, telemetry
    metrics.csv              one row per metric (key, value)
    accuracy_matrix.png      heatmap of R (class-incremental)
    checkpoints/state.pt     everything needed to resume after the last finished experience
    logs/                    CSV logger output; wandb/ holds the (offline) wandb run
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut only once its folder is synced


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself is synced
    finally:
        os.close(fd)


def clean_interrupted_writes(run_dir: Path) -> list[Path]:
    """Remove the temporary files (`.NAME.XXXX.tmp`) of atomic writes a killed process left behind.
    Call only while holding the run folder's lock: then no live writer owns them."""
    removed = []
    for tmp in Path(run_dir).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


def json_safe(obj, where: str = "", found: dict | None = None):
    """`obj` with every non-finite float replaced by None; `found` collects {path: 'nan'|'inf'|'-inf'}."""
    found = {} if found is None else found
    if isinstance(obj, float) and not math.isfinite(obj):
        found[where or "."] = str(obj)
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor) or hasattr(obj, "tolist"):
        return json_safe(obj.tolist(), where, found)
    return obj


def atomic_write_json(path: Path, obj) -> None:
    """Strict JSON: a non-finite number is written as null, and a dict gets `non_finite` naming
    each such field and its value (bare NaN/Infinity is not JSON; most readers refuse it)."""
    found: dict = {}
    obj = json_safe(obj, found=found)
    if found and isinstance(obj, dict):
        obj["non_finite"] = {**(obj.get("non_finite") or {}), **found}
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False))


def atomic_torch_save(path: Path, obj) -> None:
    """A checkpoint with its checksum (nlcl.checkpoint_io), written atomically."""
    from nlcl.checkpoint_io import encode

    atomic_write_bytes(Path(path), encode(obj))


def safe_torch_load(path: Path):
    """Load a checkpoint without running code from it, after verifying its checksum."""
    from nlcl.checkpoint_io import load

    return load(path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_metrics_csv(path: Path, metrics: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", "value"])
    for k, v in metrics.items():
        w.writerow([k, v])
    atomic_write_text(path, buf.getvalue())


def load_run(path: str | Path) -> dict:
    """Read a run folder (or its results.json) into a dict; adds `run_dir`."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no results.json in '{path}': is it a finished nlcl run folder?")
    with open(file) as f:
        res = json.load(f)
    if not isinstance(res, dict):
        raise ValueError(f"{file}: not a JSON object")
    res["run_dir"] = str(file.parent)
    for ev in sorted((file.parent / "evaluations").glob("*.json")):  # written by `nlcl evaluate`
        with open(ev) as f:
            res.setdefault("metrics", {})[f"eval_{ev.stem}"] = json.load(f)["mean"]
    return res


def find_runs(root: str | Path) -> list[Path]:
    """Every run folder under `root` (a run folder itself, a sweep folder, or a tree of them)."""
    root = Path(root)
    if (root / "results.json").exists():
        return [root]
    return sorted(p.parent for p in root.rglob("results.json"))


def runs_table(paths) -> "pandas.DataFrame":
    """One row per run: its identity (stream, model, strategy, seed) and its final metrics."""
    import pandas as pd

    rows = []
    for p in paths:
        for run in find_runs(p):
            r = load_run(run)
            row = {"run": Path(r["run_dir"]).name, "status": r.get("status", "finished"),
                   "stream": r.get("stream"), "model": r.get("model"), "strategy": r.get("strategy"),
                   "seed": r.get("seed")}
            row.update({k: v for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))})
            row["train_s"] = sum(t.get("train_s", 0.0) for t in r.get("timings", {}).get("experiences", []))
            rows.append(row)
    return pd.DataFrame(rows)


def format_matrix(R, row_labels=None, col_labels=None, scale: float = 100.0) -> str:
    """Plain-text accuracy matrix (percent by default)."""
    n_cols = len(R[0]) if len(R) else 0
    names = list(col_labels or [])
    width = 8
    # names that do not fit a column are never cut (cut names can coincide, e.g. "banking-0" and
    # "banking-1"): the columns become e0, e1, ... and a legend below gives every name in full
    legend = bool(names) and any(len(c) > width - 1 for c in names)
    cols = [f"e{j}" for j in range(n_cols)] if legend or not names else names
    row_labels = row_labels or (["init"] + [f"after e{i}" for i in range(len(R) - 1)])
    lines = [" " * 10 + "".join(f"{c:>{width}}" for c in cols)]
    for label, row in zip(row_labels, R):
        cells = "".join(f"{'nan' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{scale * v:.{1 if scale * abs(v) < 1e5 else 0}f}':>{width}}"
                        for v in row)
        lines.append(f"{label[:10]:<10}{cells}")
    if legend:
        lines += [f"  e{j} = {name}" for j, name in enumerate(names)]
    return "\n".join(lines)


def plot_accuracy_matrix(R, path: Path, title: str = "", col_labels=None, percent: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    R = np.asarray(R, dtype=float) * (100 if percent else 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * R.shape[1], 1.0 + 0.45 * R.shape[0]))
    # scores that are not percentages (perplexity) get a log colour scale over their own range
    norm = None if percent else matplotlib.colors.LogNorm(vmin=max(np.nanmin(R), 1e-3), vmax=np.nanmax(R))
    im = ax.imshow(R, vmin=0 if percent else None, vmax=100 if percent else None, norm=norm,
                   cmap="viridis" if percent else "viridis_r", aspect="auto")
    mid = 60 if percent else float(np.sqrt(np.nanmin(R) * np.nanmax(R)))
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color=("white" if R[i, j] < mid else "black") if percent else ("white" if R[i, j] > mid else "black"))
    ax.set_xticks(range(R.shape[1]), [f"{j}: {n}" for j, n in enumerate(col_labels)] if col_labels
                  else [str(j) for j in range(R.shape[1])], rotation=45, ha="right", fontsize=7)  # names in full
    ax.set_yticks(range(R.shape[0]), ["init"] + [f"after {i}" for i in range(R.shape[0] - 1)], fontsize=7)
    ax.set_xlabel("evaluated on experience")
    ax.set_ylabel("trained up to")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)" if percent else "score")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def resume_command(run_dir: Path, overrides: list[str] | None = None) -> str:
    """The command that resumes (or reuses) the run in `run_dir`: its own overrides, recorded by Hydra
    in .hydra/overrides.yaml, with run_dir pinned (the default folder name carries a timestamp, so
    the bare command would start a new run elsewhere)."""
    import shlex

    import yaml

    run_dir = Path(run_dir)
    if overrides is None:
        try:
            overrides = [str(o) for o in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []]
        except (OSError, ValueError, yaml.YAMLError):
            overrides = []
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("run_dir=", "hydra.", "hydra/"))]
    return " ".join(["nlcl run", *map(shlex.quote, keep), shlex.quote(f"run_dir={run_dir}")])
