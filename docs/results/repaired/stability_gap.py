"""The stability gap from step-granular curves (`trainer.eval_every_n_steps`): for each new experience
e >= 1, the mean accuracy on the experiences before e just before e starts (`before`), its lowest
value while e trains (`lowest`) and its value when e ends (`end`); gap = before - lowest, recovery =
end - lowest, averaged over e and then over seeds. Also a figure of the accuracy on the first
experience over all steps. Used by make_reports.py; runs alone too:

    python docs/results/repaired/stability_gap.py runs/stability_gap docs/results/repaired/stability_gap
"""
import sys
from pathlib import Path

import numpy as np

from nlcl import report


def gap_of_run(curves: list[dict]) -> dict:
    by_exp: dict[int, list[dict]] = {}
    for c in curves:
        by_exp.setdefault(int(c["experience"]), []).append(c)
    gaps, recoveries, lowest_steps = [], [], []
    for e in sorted(by_exp):
        if e == 0 or (e - 1) not in by_exp:
            continue
        old = lambda c: float(np.mean(c["scores"][:e]))  # noqa: E731
        before = old(by_exp[e - 1][-1])
        during = [old(c) for c in by_exp[e]]
        lowest = min(during)
        gaps.append(before - lowest)
        recoveries.append(during[-1] - lowest)
        lowest_steps.append(by_exp[e][int(np.argmin(during))]["step"] - by_exp[e][0]["step"])
    return {"gap": float(np.mean(gaps)), "recovery": float(np.mean(recoveries)),
            "steps_to_lowest": float(np.mean(lowest_steps)), "points": len(curves)}


def name_of(r: dict) -> str:
    return f"{r['model']}/{r['strategy']}"


def table(runs: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("curves"):
            groups.setdefault(name_of(r), []).append(gap_of_run(r["curves"]))
    lines = ["| model/strategy | n | gap (points of accuracy on old experiences) | recovery by the experience's end | "
             "steps from the first evaluation in the experience to the lowest point | curve points per run |", "|---|---|---|---|---|---|"]
    for name, gs in sorted(groups.items()):
        cells = []
        for key in ("gap", "recovery"):
            mean, _, half, n = report.mean_std_ci([100 * g[key] for g in gs])
            cells.append(f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {half:.2f}")
        steps = np.mean([g["steps_to_lowest"] for g in gs])
        lines.append(f"| {name} | {len(gs)} | {cells[0]} | {cells[1]} | {steps:.1f} steps | {gs[0]['points']} |")
    return "\n".join(lines) + "\n"


def figure(runs: list[dict], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    groups: dict[str, list[list[dict]]] = {}
    for r in runs:
        if r.get("curves"):
            groups.setdefault(name_of(r), []).append(r["curves"])
    if not groups:
        return None
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    for name, curve_sets in sorted(groups.items()):
        steps = [c["step"] for c in curve_sets[0]]
        n = min(len(cs) for cs in curve_sets)
        first = np.mean([[c["scores"][0] for c in cs[:n]] for cs in curve_sets], 0)
        ax.plot(steps[:n], 100 * first, label=f"{name} (n={len(curve_sets)})")
    points = curve_sets[0]
    for before, after in zip(points, points[1:]):
        if after["experience"] != before["experience"]:  # an experience boundary between two evaluations
            ax.axvline((before["step"] + after["step"]) / 2, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy on experience 0 (%)")
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    runs, _ = report.load_runs([Path(sys.argv[1])])
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    print(table(runs))
    figure(runs, out / "stability_gap.png")
