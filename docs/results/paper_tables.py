"""Put nlcl runs next to the paper's Tables 4 (MAD), 5 (formal languages) and 6 (ablations).

    python docs/results/paper_tables.py formal runs/formal_languages
    python docs/results/paper_tables.py mad runs/mad
    python docs/results/paper_tables.py ablations runs/hope_ablations

Reads finished runs through nlcl.report.load_runs (the same loader as `nlcl report`) and prints a
markdown table; the paper's numbers are those of its §6.7-6.9 (arXiv 2512.24695).
"""
from __future__ import annotations

import json
import statistics
import sys

from nlcl.report import load_runs

LANGUAGES = ["parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2"]
PAPER_FORMAL = {  # Bin0 / Bin1 accuracy, %
    "lstm": ["100 / 100"] * 6,
    "transformer": ["46.4 / 0.0", "0 / 0", "0 / 0", "100 / 100", "100 / 100", "100 / 100"],
    "hope": ["100 / 100"] * 6,
}
MAD_TASKS = ["compression", "in_context_recall", "fuzzy_in_context_recall", "selective_copying", "memorization"]
PAPER_MAD = {"transformer": [49.4, 100, 47.9, 96.2, 83.7], "titans": [49.8, 100, 50.0, 99.4, 83.4],
             "hope": [51.2, 100, 52.1, 99.7, 85.2]}
PAPER_ABLATION_PPL = {"hope": 12.24, "gd": 13.41, "momentum": 13.58, "no_retention": 13.71, "no_cms": 13.04,
                      "static_k": 13.77, "static_v": 13.90, "adaptive_q": 12.19}
ABLATION_LABEL = {"hope": "Hope (DGD, retention, adaptive k and v, static q, CMS 1/8/64, no momentum)",
                  "gd": "GD instead of DGD", "momentum": "with momentum (paper: w/o momentum)",
                  "no_retention": "w/o retention (alpha = 1)", "no_cms": "w/o CMS",
                  "static_k": "static k", "static_v": "static v", "adaptive_q": "adaptive q (paper: w/o adaptive q)"}
MODELS = ["lstm", "transformer", "titans", "hope"]


def _setting(run: dict, key: str):
    value = run["settings"].get(key)
    return json.loads(value) if isinstance(value, str) and value.startswith("[") else value


def _mean_cell(values: list[float]) -> str:
    """Mean in %, with the seeds' range when there is more than one."""
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} [{100 * min(values):.0f}-{100 * max(values):.0f}]"


def formal(runs: list[dict]) -> str:
    """Bin0 / Bin1 cells; with several seeds, the mean and [min-max] over seeds, and n."""
    scores: dict[tuple, list[tuple]] = {}
    for r in runs:
        (lang,) = _setting(r, "task.languages")
        m = r["metrics"]
        scores.setdefault((r["model"], lang), []).append((m["acc_final"], m.get("eval_bin1")))
    cells = {}
    for key, pairs in scores.items():
        bin0 = [a for a, _ in pairs]
        bin1 = [b for _, b in pairs if b is not None]
        cell = f"{_mean_cell(bin0)} / " + (_mean_cell(bin1) if len(bin1) == len(pairs) else "?")
        cells[key] = cell + (f" (n={len(pairs)})" if len(pairs) > 1 else "")
    lines = ["| model | " + " | ".join(LANGUAGES) + " |", "|---" * (len(LANGUAGES) + 1) + "|"]
    for model in MODELS:
        if any((model, lang) in cells for lang in LANGUAGES):
            lines.append(f"| {model} (nlcl) | " + " | ".join(cells.get((model, lang), "-") for lang in LANGUAGES) + " |")
        if model in PAPER_FORMAL:
            lines.append(f"| {model} (paper) | " + " | ".join(PAPER_FORMAL[model]) + " |")
    return "\n".join(lines)


def mad(runs: list[dict]) -> str:
    cells = {}
    for r in runs:
        (task,) = _setting(r, "task.tasks")
        cells[r["model"], task] = f"{100 * r['metrics']['acc_final']:.1f}"
    lines = ["| model | " + " | ".join(MAD_TASKS) + " |", "|---" * (len(MAD_TASKS) + 1) + "|"]
    for model in MODELS:
        if any((model, t) in cells for t in MAD_TASKS):
            lines.append(f"| {model} (nlcl) | " + " | ".join(cells.get((model, t), "-") for t in MAD_TASKS) + " |")
        if model in PAPER_MAD:
            lines.append(f"| {model} (paper) | " + " | ".join(str(v) for v in PAPER_MAD[model]) + " |")
    return "\n".join(lines)


def ablations(runs: list[dict]) -> str:
    ppl: dict[str, dict[int, float]] = {}  # variant -> seed -> test perplexity
    for r in runs:
        ppl.setdefault(r["variant"] or "hope", {})[r["seed"]] = r["metrics"]["acc_final"]
    base = ppl.get("hope", {})
    lines = ["| variant | nlcl test ppl (per seed) | nlcl mean | change vs Hope (mean; per seed, paired) "
             "| paper ppl | paper change |", "|---|---|---|---|---|---|"]
    for name in ABLATION_LABEL:
        if name not in ppl:
            continue
        seeds = sorted(ppl[name])
        mean = statistics.mean(ppl[name].values())
        paired = " / ".join(f"{ppl[name][s] - base[s]:+.2f}" for s in seeds if s in base)
        change = f"{mean - statistics.mean(base.values()):+.3f}" if base else "?"
        paper = PAPER_ABLATION_PPL[name]
        lines.append(f"| {ABLATION_LABEL[name]} | {', '.join(f'{ppl[name][s]:.3f}' for s in seeds)} | {mean:.3f} | "
                     f"{change} ({paired}) | {paper} | {paper - PAPER_ABLATION_PPL['hope']:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("formal", "mad", "ablations"):
        print(__doc__)
        return 2
    runs, _ = load_runs(argv[1:])
    print({"formal": formal, "mad": mad, "ablations": ablations}[argv[0]](runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
