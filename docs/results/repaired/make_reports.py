"""Regenerate docs/results/repaired: the claims table's rows re-run with the repaired Hope (issue 17).

    python docs/results/repaired/make_reports.py runs docs/results/repaired

For every row whose runs exist under RUNS/<row>: nlcl's own report in OUT/<row>/ (its head, the
commands and hardware, from <row>/head.md here) and the row's lines of the summary table
(OUT/<row>/summary_rows.md); a row whose runs are not under RUNS keeps its stored lines, so one row
can be re-run without the others' run folders. Then one before/after table in OUT/report.md
(from report_head.md, at {{TABLE}}): the new runs against the runs stored with the earlier report
(docs/results/<old>/runs.csv, same protocol unless the row's head says otherwise), with the
mechanism telemetry of every Hope-family configuration next to its number.
"""
import sys
from pathlib import Path

import pandas as pd

from nlcl import report

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
# row -> (stored report with the pre-repair runs or None, metrics of its table)
ROWS = {
    "clinc_scratch": ("clinc_scratch", ["acc_final", "forgetting_max", "learning_accuracy"]),
    "banking77_scratch": ("banking77_scratch", ["acc_final", "forgetting_max", "learning_accuracy"]),
    "knowledge_families": ("knowledge_families", ["acc_final", "forgetting_max", "learning_accuracy"]),
    "mad_long": ("mad_long", ["acc_final"]),
    "lm_shakespeare": (None, ["acc_final"]),
    "hope_ablations": ("hope_ablations", ["acc_final"]),
    "stability_gap": (None, ["acc_final", "forgetting_max", "learning_accuracy"]),
    "tuning_clinc": (None, ["acc_final", "forgetting_max", "learning_accuracy"]),  # validation split
    "tuning_banking77": (None, ["acc_final", "forgetting_max", "learning_accuracy"]),  # validation split
    "tuned_clinc": ("clinc_scratch", ["acc_final", "forgetting_max", "learning_accuracy"]),
    "tuned_banking77": ("banking77_scratch", ["acc_final", "forgetting_max", "learning_accuracy"]),
    "mad_probe": (None, ["acc_final"]),
    "mad_budget": (None, ["acc_final"]),
    "lm_lr1e-3": (None, ["acc_final"]),  # the lm_shakespeare row at lower learning rates
    "lm_lr3e-4": (None, ["acc_final"]),
}


def cell(values, scale: float) -> str:
    values = [v for v in values if pd.notna(v)]
    if not values:
        return "-"
    mean, _, half, n = report.mean_std_ci([scale * v for v in values])
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {half:.2f}"


def group_name(run: dict) -> str:
    parts = [str(run.get("model"))]
    if run.get("strategy") not in (None, "naive"):
        parts.append(str(run["strategy"]))
    if run.get("variant"):
        parts.append(str(run["variant"]))
    return "/".join(parts)


def mechanism(runs: list[dict]) -> str:
    """Mean over the configuration's runs: self-modifying writes per sequence of the k memory and the
    fraction of negative transition eigenvalues (first layer, mean over experiences), and the slowest CMS
    level's update count and step size relative to the period-1 level."""
    writes, negative, slow_updates, slow_rel = [], [], [], []
    memory = "k"
    for r in runs:
        for entry in r.get("mechanism_telemetry") or []:  # one per experience
            layers = entry["layers"]
            first = layers[sorted(layers)[0]]
            # the k memory's writes; the eta memory's where k is static (every generator writes alike)
            memory = "k" if "writes_per_sequence/k" in first else "eta"
            writes.append(first.get(f"writes_per_sequence/{memory}", float("nan")))
            negative.append(100 * first.get("negative_eigenvalue_fraction", float("nan")))
        levels = {k: v for k, v in (r.get("level_telemetry") or {}).items() if k.startswith("cms")}
        if levels:
            slow = max(levels, key=lambda k: int(k.rsplit("_p", 1)[-1]) if "_p" in k else 0)
            slow_updates.append(levels[slow]["updates"])
            slow_rel.append(levels[slow].get("relative_step", float("nan")))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = []
    if writes:
        out.append(f"{memory} writes/seq {mean(writes):.1f}, negative eigenvalues {mean(negative):.1f}%")
    if slow_updates:
        out.append(f"slowest level {mean(slow_updates):.0f} updates, relative step {mean(slow_rel):.2f}")
    return "; ".join(out) or "-"


def load_diverged(run_dir: Path) -> dict | None:
    """A diverged run's identity (model, strategy, variant, seed) from its results.json."""
    import json

    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None


def rows_of(row: str, new_runs: list[dict], old: pd.DataFrame | None, metrics: list[str],
            diverged: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in new_runs:
        groups.setdefault(group_name(r), []).append(r)
    lost: dict[str, list[str]] = {}
    for r in diverged:  # never in a mean; named in the row so a reader sees them
        lost.setdefault(group_name(r), []).append(str(r.get("seed")))
    out = [f"| {row} | {name} | - | every run diverged | (diverged: seed {', '.join(sorted(seeds))}) | - | - | - |"
           for name, seeds in sorted(lost.items()) if name not in groups]
    for name, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.get("seed", 0))
        scale = 1.0 if not rs[0].get("higher_is_better", True) else 100.0  # perplexity stays as is
        before = "-"
        if old is not None:
            model, *rest = name.split("/")
            sub = old[(old["model"] == model) & (old["status"] == "finished")]
            variant = rest[-1] if rest and rest[-1] != rs[0].get("strategy") else ""
            sub = sub[sub["variant"].fillna("").astype(str) == variant] if "variant" in sub else sub
            if not sub.empty:
                before = f"{cell(sub[metrics[0]], scale)} (n={len(sub)})"
        after = [cell([r["metrics"].get(m) for r in rs], scale) for m in metrics]
        seeds = " / ".join(f"{scale * r['metrics'][metrics[0]]:.2f}" for r in rs)
        evidence = mechanism(rs)
        if name in lost:
            seeds += f" (diverged: seed {', '.join(sorted(lost[name]))})"
        out.append(f"| {row} | {name} | {before} | {after[0]} (n={len(rs)}) | {seeds} | "
                   + " | ".join(after[1:] + ["-"] * (2 - len(after[1:]))) + f" | {evidence} |")
    return out


def main(runs_root: Path, out: Path) -> str:
    lines = ["| row | configuration | before: first metric (n) | after: first metric | after, per seed | "
             "after: forgetting_max | after: learning_accuracy | mechanism telemetry (training) |",
             "|---|---|---|---|---|---|---|---|"]
    for row, (old_dir, metrics) in ROWS.items():
        stored = out / row / "summary_rows.md"  # this row's lines of the table, as last generated
        if not any((runs_root / row).glob("*/results.json")):
            # a checkout has the reports, not the run folders: keep the row's last generated lines
            lines += stored.read_text().splitlines() if stored.exists() else []
            continue
        rep = report.build_report([runs_root / row], out / row, metrics=metrics)
        head = HERE / row / "head.md"
        text = (head.read_text() + "\n" if head.exists() else "") + rep.markdown
        if row == "stability_gap":
            import stability_gap  # this folder's own script

            stability_gap.figure(rep.runs, out / row / "stability_gap.png")
            text = text.replace("\n# nlcl report\n", "\n## The gap, measured\n\n" + stability_gap.table(rep.runs)
                                + "\n![stability gap](stability_gap.png)\n\n# nlcl report\n", 1)
        if row == "hope_ablations":  # the paper's Table 6 next to ours, paired by seed
            sys.path.insert(0, str(HERE.parent))
            import paper_tables  # docs/results/paper_tables.py

            text = text.replace("\n# nlcl report\n", "\n## Against the paper's Table 6\n\n" + paper_tables.ablations(rep.runs)
                                + "\n# nlcl report\n", 1)
        (out / row / "report.md").write_text(text)
        old = pd.read_csv(HERE.parent / old_dir / "runs.csv") if old_dir else None
        diverged = [load_diverged(Path(r["run_dir"])) for r in rep.left_out if r["status"] == "diverged"]
        row_lines = rows_of(row, rep.runs, old, metrics, [d for d in diverged if d])
        stored.write_text("\n".join(row_lines) + "\n")
        lines += row_lines
    table = "\n".join(lines) + "\n"
    (out / "report.md").write_text((HERE / "report_head.md").read_text().replace("{{TABLE}}", table))
    return table


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), Path(sys.argv[2])))
