"""`nlcl report PATH...`: aggregate runs across seeds and draw what a reader wants.

Input: run folders, sweep folders, or trees of them. Output (in --out, default the first path):
report.md, report.csv (one row per configuration: mean, std, 95% CI half-width, n seeds), runs.csv
(one row per run) and PNGs: mean accuracy matrices, accuracy of each experience over training
(forgetting curves), final metrics with intervals, per-level telemetry when present.

A configuration is one value of (stream, model, strategy, optim, variant); its runs differ only
by seed. Scores that are fractions (accuracies, exact match) are shown in %, others (perplexity)
as they are.

Step-granular curves: when a run's results.json holds `curves`, a list of records
`{"step": global optimizer step, "experience": index being trained, "scores": [score on every
experience]}`, the forgetting-curve plot uses them instead of the accuracy matrix.

The functions are the API of notebooks/compare_runs.ipynb: `load_runs`, `aggregate`,
`summary_table`, and the `fig_*` functions, which return matplotlib Figures without touching
pyplot's global state (so they work headless and inline in a notebook).
"""
from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nlcl.results import atomic_write_bytes, atomic_write_text, find_runs, format_matrix, load_run, resume_command

GROUP_KEYS = ["stream", "model", "strategy", "optim", "variant"]
HEADLINE = ["acc_final", "acc_avg_incremental", "forgetting_max", "forgetting_first", "bwt", "learning_accuracy",
            "acc_final_task_il"]
BAR_METRICS = ("acc_final", "forgetting_max", "bwt")
TELEMETRY = ("updates", "grad_norm", "update_norm", "step_rms", "relative_step")


# ---------------------------------------------------------------- statistics (pure functions)

def t_critical_95(n: int) -> float:
    """Two-sided 95% Student-t critical value for a mean of n samples (n-1 degrees of freedom)."""
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_std_ci(values) -> tuple[float, float, float, int]:
    """(mean, sample std with ddof=1, 95% CI half-width t_{0.975, n-1} * std / sqrt(n), n), NaNs dropped.
    With one value, std and CI are NaN: one seed says nothing about the spread."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(v.mean())
    if n == 1:
        return mean, float("nan"), float("nan"), 1
    std = float(v.std(ddof=1))
    return mean, std, t_critical_95(n) * std / math.sqrt(n), n


def is_fraction(score_name: str | None) -> bool:
    """Accuracies and exact match live in [0, 1] and are shown in %; perplexity is not."""
    name = (score_name or "accuracy").lower()
    return name in ("accuracy", "exact_match", "score") or name.endswith("accuracy")


def scale_of(score_name: str | None) -> float:
    return 100.0 if is_fraction(score_name) else 1.0


# ---------------------------------------------------------------- loading

# fields of the resolved config that do not make a configuration different: the seed, where and
# how a run is logged, and the identity keys (compared on their own)
IGNORED_SETTINGS = ("seed", "run_dir", "experiment_name", "variant", "logger", "trainer.progress_bar",
                    "trainer.log_every", "trainer.eval_batch_size", "trainer.eval_every_n_steps",
                    "trainer.eval_subsample", "task.stream", "model.name", "strategy.name", "optim.name")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def run_settings(run: dict) -> dict:
    """The run's resolved config (config.yaml in its folder, else the `config` of a failed run),
    flattened to {"a.b": value}, without IGNORED_SETTINGS; {} when neither exists."""
    config = run.get("config")
    file = Path(run.get("run_dir", "")) / "config.yaml"
    if config is None and file.is_file():
        import yaml

        try:
            config = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:  # e.g. a `!!python/...` tag: refused, never constructed
            raise ValueError(f"{file}: not plain YAML ({str(e).strip().splitlines()[0]})") from None
    flat = _flatten(config or {})
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED_SETTINGS)}


def config_key(run: dict) -> tuple:
    """Identity keys, then every other setting: two sweeps that differ in, say, optim.lr stay apart."""
    settings = run.get("settings") or {}
    return (*(str(run.get(k) or "") for k in GROUP_KEYS), tuple(sorted((k, str(v)) for k, v in settings.items())))


def _unfinished_folders(root: Path) -> list[Path]:
    """Run folders without results.json: Hydra made them (.hydra/) or the runner saved a resumable
    state (checkpoints/state.pt) but the run has not finished."""
    folders = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    folders |= {p.parent.parent for p in root.rglob("state.pt") if p.parent.name == "checkpoints"}
    return sorted(f for f in folders if not (f / "results.json").exists())


STATUSES = ("finished", "failed", "diverged")


def _matrix_problem(R, n: int | None, fraction: bool) -> str | None:
    if not isinstance(R, list) or not R or not all(isinstance(row, list) for row in R):
        return "is not a list of rows"
    n = len(R[0]) if n is None else n
    if n < 1 or len(R) != n + 1 or any(len(row) != n for row in R):
        return f"has shape {[len(row) for row in R]}, expected {n + 1} rows of {n}"
    for row in R:
        for v in row:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"holds {v!r}, not a finite number"
            if fraction and not 0.0 <= v <= 1.0:
                return f"holds {v!r}, outside [0, 1] for a fraction"
    return None


def run_problem(r: dict) -> str | None:
    """Why a loaded results.json cannot be trusted (wrong types, shapes, ranges, non-finite
    numbers), or None. Only finished runs are checked in depth; others must name their status."""
    status = r.get("status", "finished")
    if status not in STATUSES:
        return f"status {status!r} is not one of {STATUSES}"
    for key in ("stream", "model", "strategy", "optim", "variant", "score_name"):
        if r.get(key) is not None and not isinstance(r.get(key), str):
            return f"{key} is {r.get(key)!r}, not a string"
    if r.get("seed") is not None and (isinstance(r["seed"], bool) or not isinstance(r["seed"], int)):
        return f"seed is {r['seed']!r}, not an integer"
    if status != "finished":
        return None
    fraction = scale_of(r.get("score_name")) == 100 and r.get("higher_is_better", True) is True
    experiences = r.get("experiences")
    n = len(experiences) if isinstance(experiences, list) and experiences else None
    for key in ("accuracy_matrix", "accuracy_matrix_task_il"):
        if key in r or key == "accuracy_matrix":
            problem = _matrix_problem(r.get(key), n, fraction)
            if problem:
                return f"{key} {problem}"
    metrics = r.get("metrics")
    if not isinstance(metrics, dict):
        return "metrics is not a mapping"
    for k, v in metrics.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"metrics.{k} is {v!r}, not a finite number"
        if fraction and not -1.0 <= v <= 1.0:  # accuracies, forgetting and transfer of fractions
            return f"metrics.{k} is {v!r}, outside [-1, 1] for a score in [0, 1]"
    if not isinstance(r.get("timings", {}), dict):
        return "timings is not a mapping"
    return None


def load_runs(paths) -> tuple[list[dict], list[dict]]:
    """(finished runs, runs left out). Left out, each with `status` and `error`: failed runs, run
    folders without results.json ("incomplete": still running or killed), and repeats of a
    (configuration, seed) already loaded ("duplicate": the first one by path is kept)."""
    finished, left_out, seen = [], [], {}
    for p in paths:
        p = Path(p)
        for run_dir in find_runs(p):
            try:
                r = load_run(run_dir)
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                left_out.append({"run_dir": str(run_dir), "status": "invalid",
                                 "error": f"{run_dir / 'results.json'}: unreadable ({type(e).__name__}: {e})"})
                continue
            problem = run_problem(r) if isinstance(r, dict) else "not a JSON object"
            if problem:
                left_out.append({"run_dir": str(run_dir), "status": "invalid",
                                 "error": f"{run_dir / 'results.json'}: {problem}"})
                continue
            r.setdefault("variant", "")
            try:
                r["settings"] = run_settings(r)
            except ValueError as e:
                left_out.append({"run_dir": str(run_dir), "status": "invalid", "error": str(e)})
                continue
            if r.get("status", "finished") != "finished":
                left_out.append(r)
                continue
            key = (config_key(r), r.get("seed"))
            if key in seen:
                left_out.append({**r, "status": "duplicate",
                                 "error": f"same configuration and seed as {seen[key]}; not counted"})
                continue
            seen[key] = r["run_dir"]
            finished.append(r)
        for folder in _unfinished_folders(p):
            left_out.append({"run_dir": str(folder), "status": "incomplete",
                             "error": f"no results.json: still running or killed; resume it with: {resume_command(folder)}"})
    return finished, left_out


# ---------------------------------------------------------------- aggregation

def label_keys(runs: list[dict]) -> list[str]:
    """The identity keys that differ between runs (model and strategy when none do)."""
    varying = [k for k in GROUP_KEYS if len({str(r.get(k) or "") for r in runs}) > 1]
    return varying or ["model", "strategy"]


# a setting under one of these sections only tells configurations apart among runs that share the
# section's identity: replay's mem_size is no news next to naive, but is between two replay runs
SECTION_IDENTITY = {"task": "stream", "model": "model", "strategy": "strategy", "optim": "optim"}


def varying_settings(runs: list[dict]) -> list[str]:
    """Settings (beyond the identity keys) whose value is not the same in every run."""
    names = sorted({k for r in runs for k in (r.get("settings") or {})})

    def varies(name: str) -> bool:
        identity = SECTION_IDENTITY.get(name.split(".")[0])
        groups: dict[str, set] = {}
        for r in runs:
            groups.setdefault(str(r.get(identity)) if identity else "", set()).add(str((r.get("settings") or {}).get(name)))
        return any(len(values) > 1 for values in groups.values())

    return [k for k in names if varies(k)]


def config_labels(runs: list[dict]) -> dict[tuple, str]:
    """A short readable label per configuration: the identity keys that vary, then `field=value` for
    each other setting that varies, e.g. 'hope/replay' or 'naive optim.lr=0.003'."""
    keys, settings = label_keys(runs), varying_settings(runs)
    labels = {}
    for r in runs:
        own = r.get("settings") or {}
        label = "/".join(str(r.get(k)) for k in keys if r.get(k)) or "run"
        identity_of = lambda k: SECTION_IDENTITY.get(k.split(".")[0])  # noqa: E731
        shown = [k for k in settings if k in own or not identity_of(k)]
        labels[config_key(r)] = " ".join([label, *(f"{k}={own.get(k)}" for k in shown)])
    return labels


def config_label(run: dict, runs: list[dict] | None = None) -> str:
    return config_labels(runs or [run])[config_key(run)]


def aggregate(runs: list[dict], metrics: list[str] = HEADLINE) -> pd.DataFrame:
    """One row per configuration: identity keys, `config` (a short label), `n_seeds`, `seeds`,
    `score_name`, and for every metric (and train_s) `<m>_mean`, `<m>_std`, `<m>_ci95`, `<m>_n`."""
    if not runs:
        return pd.DataFrame()
    rows = []
    for label, rs in _by_config(runs):
        rec = {k: str(rs[0].get(k) or "") for k in GROUP_KEYS}
        rec["config"] = label
        rec["n_seeds"] = len(rs)
        rec["seeds"] = " ".join(str(s) for s in sorted(r.get("seed") for r in rs))
        rec["score_name"] = rs[0].get("score_name", "accuracy")
        for m in [*metrics, "train_s"]:
            values = [r.get("timings", {}).get("train_s", float("nan")) if m == "train_s"
                      else r.get("metrics", {}).get(m, float("nan")) for r in rs]
            values = [float("nan") if v is None else v for v in values]
            rec[f"{m}_mean"], rec[f"{m}_std"], rec[f"{m}_ci95"], rec[f"{m}_n"] = mean_std_ci(values)
        rows.append(rec)
    return pd.DataFrame(rows)


def summary_table(agg: pd.DataFrame, metrics: list[str] = HEADLINE) -> pd.DataFrame:
    """Printable table: one row per configuration, cells 'mean ± CI' (percent for fractions)."""
    rows = []
    for _, r in agg.iterrows():
        scale = scale_of(r["score_name"])
        row = {"config": r["config"], "n_seeds": r["n_seeds"]}
        for m in metrics:
            mean, ci = r[f"{m}_mean"] * scale, r[f"{m}_ci95"] * scale
            row[m] = "nan" if math.isnan(mean) else f"{mean:.2f}" + ("" if math.isnan(ci) else f" ± {ci:.2f}")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(agg: pd.DataFrame, metrics: list[str] = HEADLINE) -> str:
    return markdown_frame(summary_table(agg, metrics))


def markdown_frame(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    cells = [[f"{v:{floatfmt}}" if isinstance(v, float) else md_text(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(map(md_text, df.columns)) + " |", "|" + "---|" * len(df.columns)]
                     + ["| " + " | ".join(row) + " |" for row in cells])


def runs_frame(runs: list[dict], metrics: list[str] = HEADLINE) -> pd.DataFrame:
    """One row per run: identity, seed, status, metrics, train time."""
    rows = []
    for r in runs:
        row = {k: r.get(k, "") for k in GROUP_KEYS} | {"seed": r.get("seed"), "status": r.get("status", "finished"),
                                                      "run_dir": r.get("run_dir")}
        row.update({m: r.get("metrics", {}).get(m, float("nan")) for m in metrics})
        row["train_s"] = r.get("timings", {}).get("train_s", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- figures

def _by_config(runs: list[dict]) -> list[tuple[str, list[dict]]]:
    """[(label, runs of that configuration)], sorted by label."""
    labels = config_labels(runs)
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(labels[config_key(r)], []).append(r)
    return sorted(groups.items())


def _wrap(label: str, width: int = 36) -> str:
    import textwrap

    label = str(label).replace("$", r"\$")  # a '$' would start matplotlib's mathtext
    return "\n".join(textwrap.wrap(label, width)) or label


def _grid(n: int, width: float, height: float, max_cols: int = 3):
    from matplotlib.figure import Figure

    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def fig_accuracy_matrices(runs: list[dict]):
    """Mean R over seeds, one heatmap per configuration (rows: trained up to; columns: evaluated on)."""
    groups = _by_config(runs)
    T = max(len(rs[0]["accuracy_matrix"][0]) for _, rs in groups)
    fig, axes = _grid(len(groups), 1.6 + 0.45 * T, 1.4 + 0.4 * (T + 1))
    for ax, (label, rs) in zip(axes, groups):
        scale = scale_of(rs[0].get("score_name"))
        R = np.mean([np.asarray(r["accuracy_matrix"], float) for r in rs], 0) * scale
        limits = {"vmin": 0, "vmax": 100} if scale == 100 else {}
        im = ax.imshow(R, cmap="viridis", aspect="auto", **limits)
        mid = 50 if scale == 100 else np.nanmean(R)
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if R[i, j] < mid else "black")
        names = [e["name"] for e in rs[0].get("experiences", [])] or [str(j) for j in range(R.shape[1])]
        ax.set_xticks(range(R.shape[1]), [f"{j}: {n}" for j, n in enumerate(names)], rotation=60, ha="right",
                      fontsize=6)  # names in full, numbered: never cut into look-alikes
        ax.set_yticks(range(R.shape[0]), ["init"] + [f"after {i}" for i in range(R.shape[0] - 1)], fontsize=6)
        ax.set_title(_wrap(f"{label} (n={len(rs)})", 40), fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle("mean score matrix R over seeds (rows: trained up to; columns: evaluated on)", fontsize=9)
    return fig


def _step_curves(rs: list[dict]) -> pd.DataFrame | None:
    """Long table (step, experience trained, evaluated, score), mean over seeds; None if any run lacks curves."""
    if not all(r.get("curves") for r in rs):
        return None
    rows = [(c["step"], c.get("experience", -1), j, s)
            for r in rs for c in r["curves"] for j, s in enumerate(c.get("scores", c.get("accuracy", [])))]
    df = pd.DataFrame(rows, columns=["step", "trained", "evaluated", "score"])
    return df.groupby(["step", "trained", "evaluated"], as_index=False)["score"].mean()


def fig_forgetting_curves(runs: list[dict]):
    """Score on each experience over training, mean over seeds: at step granularity when the runs
    recorded `curves`, else after each experience (from R; the band is ± one std over seeds)."""
    groups = _by_config(runs)
    fig, axes = _grid(len(groups), 4.2, 3.2)
    for ax, (label, rs) in zip(axes, groups):
        scale = scale_of(rs[0].get("score_name"))
        curves = _step_curves(rs)
        if curves is not None:
            for j, g in curves.groupby("evaluated"):
                ax.plot(g["step"], g["score"] * scale, lw=1, label=f"e{j}")
            starts = curves.groupby("trained")["step"].min()
            for s in starts.iloc[1:]:
                ax.axvline(s, color="grey", lw=0.5, ls="--")
            ax.set_xlabel("optimizer step")
        else:
            Rs = np.stack([np.asarray(r["accuracy_matrix"], float) for r in rs]) * scale
            mean, std = Rs.mean(0), Rs.std(0)
            T = mean.shape[1]
            for j in range(T):
                x = np.arange(j, T)
                line, = ax.plot(x, mean[j + 1:, j], marker="o", ms=2, lw=1, label=f"e{j}")
                if len(rs) > 1:
                    ax.fill_between(x, mean[j + 1:, j] - std[j + 1:, j], mean[j + 1:, j] + std[j + 1:, j],
                                    color=line.get_color(), alpha=0.15, lw=0)
            ax.set_xticks(range(T))
            ax.set_xlabel("trained up to experience")
        ax.set_ylabel(rs[0].get("score_name", "accuracy") + (" (%)" if scale == 100 else ""))
        if scale == 100:
            ax.set_ylim(0, 100)
        ax.set_title(_wrap(f"{label} (n={len(rs)})", 40), fontsize=7)
        ax.legend(fontsize=5, ncol=2)
    return fig


def fig_final_metrics(agg: pd.DataFrame, metrics=BAR_METRICS):
    """Final metrics per configuration as bars, error bars = 95% CI over seeds (none with one seed)."""
    from matplotlib.figure import Figure

    metrics = [m for m in metrics if f"{m}_mean" in agg]
    labels = [_wrap(x) for x in agg["config"]]
    height = 0.22 * sum(x.count("\n") + 2 for x in labels) + 1.2
    fig = Figure(figsize=(4 * len(metrics), height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    scale = np.array([scale_of(s) for s in agg["score_name"]])
    for ax, m in zip(axes, metrics):
        means = agg[f"{m}_mean"].to_numpy(float) * scale
        errs = np.nan_to_num(agg[f"{m}_ci95"].to_numpy(float) * scale)
        ax.barh(range(len(labels)), means, xerr=errs, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{m}" + (" (%)" if (scale == 100).all() else "") + ", mean ± 95% CI", fontsize=8)
        ax.axvline(0, color="black", lw=0.5)
    return fig


def telemetry_frame(runs: list[dict]) -> pd.DataFrame:
    """Per configuration and level: update count, last gradient norm, last update norm, effective step
    size (RMS distance per parameter per optimizer step) and that step size relative to the run's
    period-1 reference level (mean over seeds; NaN for runs that predate a field)."""
    labels = config_labels(runs)
    rows = [{"config": labels[config_key(r)], "level": lvl, **{k: d.get(k, float("nan")) for k in TELEMETRY}}
            for r in runs for lvl, d in (r.get("level_telemetry") or {}).items()]
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).groupby(["config", "level"], as_index=False)[list(TELEMETRY)].mean()


MECHANISM = ("writes_per_sequence/k", "writes_per_sequence/memory", "writes_per_sequence/memory_refresh",
             "backward_cuts_per_sequence/generation", "backward_cuts_per_sequence/memory",
             "eta_mean", "eta_min", "eta_max", "alpha_mean", "alpha_min", "alpha_max", "erase_mean",
             "eigenvalue_min", "negative_eigenvalue_fraction")


def mechanism_frame(runs: list[dict]) -> pd.DataFrame:
    """Per configuration and self-modifying layer: what the mechanism did while training (mean over
    experiences, then over seeds). A row of zero writes means self-modification never acted."""
    labels = config_labels(runs)
    rows = []
    for r in runs:
        per_layer: dict[str, list[dict]] = {}
        for entry in r.get("mechanism_telemetry") or []:
            for layer, stats in (entry.get("layers") or {}).items():
                per_layer.setdefault(layer, []).append(stats)
        for layer, entries in per_layer.items():
            rows.append({"config": labels[config_key(r)], "layer": layer,
                         **{k: float(np.mean([e.get(k, np.nan) for e in entries])) for k in MECHANISM}})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).groupby(["config", "layer"], as_index=False)[list(MECHANISM)].mean()
    return df.dropna(axis=1, how="all")


def fig_level_telemetry(runs: list[dict]):
    """Updates, gradient and update norms and effective step sizes of every level (None when no run
    logged levels)."""
    df = telemetry_frame(runs)
    if df.empty:
        return None
    from matplotlib.figure import Figure

    labels = [_wrap(f"{c} | {lvl}") for c, lvl in zip(df["config"], df["level"])]
    fig = Figure(figsize=(12, 0.22 * sum(x.count("\n") + 2 for x in labels) + 1.4), layout="constrained")
    axes = fig.subplots(1, len(TELEMETRY), sharey=True)
    for ax, k in zip(axes, TELEMETRY):
        ax.barh(range(len(df)), df[k].to_numpy(float), color="tab:green", alpha=0.8)
        ax.set_title(k + {"updates": " (count)", "step_rms": " (per step)",
                          "relative_step": " (vs period-1)"}.get(k, " (last step)"), fontsize=8)
    axes[0].set_yticks(range(len(df)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("per-level telemetry, mean over seeds", fontsize=9)
    return fig


def save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


# ---------------------------------------------------------------- the report

@dataclass
class Report:
    agg: pd.DataFrame        # one row per configuration (see `aggregate`)
    runs: list[dict]         # finished runs that entered the table
    left_out: list[dict]     # failed, incomplete and duplicate runs, with `status` and `error`
    markdown: str
    files: list[Path]        # everything written


def md_text(text) -> str:
    """A name made safe for markdown and HTML: one line, no tags, no table or link syntax."""
    import html

    one_line = " ".join(str(text).split())
    # quote=False: quotes are plain text here, and an entity such as &#x27; would get its # escaped
    # below and show up literally in the report
    return "".join("\\" + c if c in "\\`[]|#" else c for c in html.escape(one_line, quote=False))


def md_code(text) -> str:
    """Text for a code span or block: one line, no backticks (which would end it), no tag brackets."""
    return " ".join(str(text).split()).replace("`", "'").replace("<", "‹").replace(">", "›")


def _first_line(text) -> str:
    return str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""


def _left_out_line(r: dict) -> str:
    return (f"- {md_text(r['status'])}: `{md_code(Path(r['run_dir']).name)}` ({md_text(r.get('model', '?'))}/"
            f"{md_text(r.get('strategy', '?'))}, seed {md_text(r.get('seed', '?'))}): {md_text(_first_line(r.get('error')))}")


def build_report(paths, out: Path | None = None, plots: bool = True, metrics: list[str] = HEADLINE) -> Report:
    """Write report.md, report.csv, runs.csv (and the PNGs) into `out` (default: the first path)."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"nlcl report: '{p}' does not exist")
    runs, left_out = load_runs(paths)
    if not runs:
        reasons = "".join(f"\n  {r['run_dir']}: {r['status']}: {_first_line(r.get('error'))}" for r in left_out)
        raise FileNotFoundError(f"nlcl report: no finished runs under {[str(p) for p in paths]}{reasons}")
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs, metrics)
    n_failed = sum(r["status"] in ("failed", "invalid") for r in left_out)
    diverged = [r for r in left_out if r["status"] == "diverged"]
    left_out_other = [r for r in left_out if r["status"] != "diverged"]
    md = [f"# nlcl report\n\n{len(runs)} finished runs in {len(agg)} configurations"
          + (f", {n_failed} failed" if n_failed else "") + (f", {len(diverged)} diverged" if diverged else "") + f" (from {', '.join(str(p) for p in paths)}).\n\n"
          "Cells: mean ± 95% CI half-width over seeds (Student t with n-1 degrees of freedom; no interval with "
          "one seed); accuracies in %. forgetting_max takes the best earlier accuracy as reference, "
          "forgetting_first the accuracy right after learning (definitions: docs/metrics.md). "
          "Standard deviations and n per metric are in report.csv, every run in runs.csv.\n",
          markdown_table(agg, metrics)]
    if diverged:  # never averaged: a non-finite model's scores say nothing about the method
        md.append("\n## Diverged runs\n\nThese runs went non-finite and stopped; they are not in any mean.\n\n"
                  + "\n".join(_left_out_line(r) for r in diverged))
    if left_out_other:
        md.append("\n## Runs left out\n\n" + "\n".join(_left_out_line(r) for r in left_out_other))
    md.append("\n## Mean matrices R (rows: trained up to; columns: evaluated on)\n")
    for label, rs in _by_config(runs):
        R = np.mean([np.asarray(r["accuracy_matrix"], float) for r in rs], 0)
        names = [e["name"] for e in rs[0].get("experiences", [])] or None
        names = [md_code(x) for x in names] if names else None
        md.append(f"{md_text(label)} ({md_text(rs[0].get('score_name', 'accuracy'))}, n={len(rs)}):\n```\n"
                  f"{format_matrix(R.tolist(), col_labels=names, scale=scale_of(rs[0].get('score_name')))}\n```")
    tele = telemetry_frame(runs)
    if not tele.empty:
        md.append("\n## Per-level telemetry (mean over seeds)\n\n" + markdown_frame(tele))
    mech = mechanism_frame(runs)
    if not mech.empty:
        md.append("\n## Self-modification telemetry (training; mean over experiences and seeds)\n\n"
                  "writes_per_sequence: chunk steps whose writes are read later (k/v/eta/alpha memories), token "
                  "writes and gradient-point refreshes of the main memory; backward_cuts_per_sequence: where "
                  "model.memory.backward_window cut the outer gradient (0: sequences shorter than the window); "
                  "eigenvalue: W2's transition along k (alpha - erase).\n\n" + markdown_frame(mech))
    files = []
    if plots:
        figs = {"final_metrics.png": fig_final_metrics(agg), "accuracy_matrices.png": fig_accuracy_matrices(runs),
                "forgetting_curves.png": fig_forgetting_curves(runs), "level_telemetry.png": fig_level_telemetry(runs)}
        files = [save_figure(f, out / name) for name, f in figs.items() if f is not None]
        md.append("\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in files))
    text = "\n".join(md) + "\n"
    for name, content in (("report.md", text), ("report.csv", agg.to_csv(index=False)),
                          ("runs.csv", runs_frame(runs + left_out, metrics).to_csv(index=False))):
        atomic_write_text(out / name, content)
        files.append(out / name)
    return Report(agg, runs, left_out, text, files)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nlcl report", description=__doc__.split("\n\n")[0],
                                 epilog="e.g. nlcl report multirun/adhoc/20250101-120000 --metrics acc_final,bwt")
    ap.add_argument("paths", nargs="+", help="run folders, sweep folders, or trees of them")
    ap.add_argument("--out", default=None, help="where report.md, report.csv and the plots go (default: first path)")
    ap.add_argument("--metrics", default=",".join(HEADLINE), help=f"comma-separated metric keys (default: {','.join(HEADLINE)})")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        rep = build_report(args.paths, args.out, plots=not args.no_plots, metrics=metrics)
    except FileNotFoundError as e:
        print(e)
        return 2
    print(summary_table(rep.agg, metrics).to_string(index=False))
    for r in rep.left_out:
        print(f"left out ({r['status']}): {r['run_dir']}: {_first_line(r.get('error'))}")
    print(f"\n[nlcl] report in {Path(args.out or args.paths[0])}/: " + ", ".join(p.name for p in rep.files))
    return 0
