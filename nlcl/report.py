"""`nlcl report PATH...`: aggregate runs across seeds and draw what a reader wants.

Input: run folders, sweep folders, or trees of them. Output (in --out, default the first path):
report.md, report.csv (one row per configuration: mean, std, 95% CI half-width, n seeds), and PNGs
(mean accuracy-matrix heatmaps, final metrics with intervals, accuracy of each experience over
training, per-level telemetry when present).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from nlcl.results import atomic_write_text, find_runs, load_run, plot_accuracy_matrix

GROUP_KEYS = ["stream", "model", "strategy", "optim", "variant"]
HEADLINE = ["acc_final", "acc_avg_incremental", "forgetting_max", "forgetting_first", "bwt", "learning_accuracy",
            "acc_final_task_il"]


def t_critical_95(n: int) -> float:
    """Two-sided 95% Student-t critical value for n samples (n-1 degrees of freedom)."""
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def load_runs(paths) -> tuple[list[dict], list[dict]]:
    finished, failed = [], []
    for p in paths:
        for run_dir in find_runs(p):
            r = load_run(run_dir)
            r.setdefault("variant", r.get("config_variant", ""))
            (finished if r.get("status", "finished") == "finished" else failed).append(r)
    return finished, failed


def aggregate(runs: list[dict], metrics: list[str] = HEADLINE) -> pd.DataFrame:
    """One row per configuration: `<metric>_mean`, `_std`, `_ci95`, and `n_seeds`."""
    rows = []
    for r in runs:
        row = {k: r.get(k, "") or "" for k in GROUP_KEYS}
        row["seed"] = r.get("seed")
        row.update({m: r["metrics"].get(m, float("nan")) for m in metrics})
        row["train_s"] = r.get("timings", {}).get("train_s", float("nan"))
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    out = []
    for key, g in df.groupby(GROUP_KEYS, dropna=False, sort=True):
        rec = dict(zip(GROUP_KEYS, key))
        rec["n_seeds"] = len(g)
        for m in [*metrics, "train_s"]:
            v = g[m].astype(float).to_numpy()
            v = v[~np.isnan(v)]
            mean = float(v.mean()) if len(v) else float("nan")
            std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
            rec[f"{m}_mean"], rec[f"{m}_std"] = mean, std
            rec[f"{m}_ci95"] = t_critical_95(len(v)) * std / math.sqrt(len(v)) if len(v) > 1 else float("nan")
        out.append(rec)
    return pd.DataFrame(out)


def markdown_table(agg: pd.DataFrame, metrics: list[str] = HEADLINE, scale: float = 100.0) -> str:
    cols = [k for k in GROUP_KEYS if agg[k].astype(str).str.len().max() > 0] + ["n_seeds"]
    head = "| " + " | ".join(cols + metrics) + " |"
    lines = [head, "|" + "---|" * (len(cols) + len(metrics))]
    for _, r in agg.iterrows():
        cells = [str(r[c]) for c in cols]
        for m in metrics:
            mean, ci = r[f"{m}_mean"] * scale, r[f"{m}_ci95"] * scale
            cells.append(f"{mean:.2f}" + ("" if math.isnan(ci) else f" ± {ci:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def config_label(r) -> str:
    parts = [str(r.get(k, "")) for k in ("model", "strategy", "variant") if r.get(k)]
    return "/".join(parts)


def plot_metric_bars(agg: pd.DataFrame, out: Path, metrics=("acc_final", "forgetting_max", "bwt")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [config_label(r) for _, r in agg.iterrows()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.6 * len(labels) + 1.8))
    for ax, m in zip(np.atleast_1d(axes), metrics):
        means = agg[f"{m}_mean"].to_numpy() * 100
        errs = np.nan_to_num(agg[f"{m}_ci95"].to_numpy() * 100)
        ax.barh(range(len(labels)), means, xerr=errs, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"{m} (%), mean ± 95% CI", fontsize=9)
        ax.axvline(0, color="black", lw=0.5)
    fig.tight_layout()
    path = out / "final_metrics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_forgetting_curves(runs: list[dict], out: Path) -> Path:
    """Accuracy on each experience after each training stage, averaged over seeds, one panel per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[np.ndarray]] = {}
    for r in runs:
        groups.setdefault(config_label(r), []).append(np.asarray(r["accuracy_matrix"], dtype=float))
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, (label, mats) in zip(axes[0], sorted(groups.items())):
        R = np.mean(np.stack(mats), 0) * 100
        T = R.shape[1]
        for j in range(T):
            ax.plot(range(j + 1, T + 1), R[j + 1:, j], marker="o", ms=2, lw=1, label=f"e{j}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("trained up to experience")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / "forgetting_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_level_telemetry(runs: list[dict], out: Path) -> Path | None:
    rows = [(config_label(r), lvl, d.get("update_count", float("nan")), d.get("grad_norm", float("nan")))
            for r in runs for lvl, d in (r.get("level_telemetry") or {}).items()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows, columns=["config", "level", "updates", "grad_norm"]).groupby(["config", "level"]).mean()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(df) + 1.5))
    ax.barh([f"{c} {lvl}" for c, lvl in df.index], df["updates"])
    ax.set_xlabel("optimizer updates per level (mean over seeds)")
    fig.tight_layout()
    path = out / "level_updates.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(paths, out: Path | None = None, plots: bool = True) -> tuple[pd.DataFrame, str]:
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"nlcl report: '{p}' does not exist")
    runs, failed = load_runs(paths)
    if not runs:
        raise FileNotFoundError(f"nlcl report: no finished runs under {[str(p) for p in paths]}")
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs)
    md = [f"# nlcl report\n\n{len(runs)} finished runs" + (f", {len(failed)} failed" if failed else "") +
          f" from {', '.join(str(p) for p in paths)}. Values in %, mean ± 95% CI half-width over seeds "
          "(Student t); forgetting_max uses the best earlier accuracy as reference, forgetting_first the "
          "accuracy right after learning.\n", markdown_table(agg)]
    if failed:
        md.append("\n## Failed runs\n" + "\n".join(f"- {Path(r['run_dir']).name}: {r.get('error', '')}" for r in failed))
    if plots:
        figs = [plot_metric_bars(agg, out), plot_forgetting_curves(runs, out), plot_level_telemetry(runs, out)]
        by_cfg: dict[str, list] = {}
        for r in runs:
            by_cfg.setdefault(config_label(r), []).append(r)
        for label, rs in sorted(by_cfg.items()):
            R = np.mean([np.asarray(r["accuracy_matrix"], float) for r in rs], 0)
            path = out / f"matrix_{label.replace('/', '_')}.png"
            plot_accuracy_matrix(R, path, title=f"{label}: mean R over {len(rs)} seed(s)",
                                 col_labels=[e["name"] for e in rs[0]["experiences"]])
            figs.append(path)
        md.append("\n## Plots\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figs if f is not None))
    text = "\n".join(md) + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.csv", agg.to_csv(index=False))
    return agg, text


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nlcl report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders, sweep folders, or trees of them")
    ap.add_argument("--out", default=None, help="where report.md, report.csv and the plots go (default: first path)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    try:
        agg, text = build_report(args.paths, args.out, plots=not args.no_plots)
    except FileNotFoundError as e:
        print(e)
        return 2
    print(text)
    print(f"[nlcl] report written to {Path(args.out or args.paths[0]) / 'report.md'}")
    return 0
