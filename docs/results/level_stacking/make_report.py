"""Regenerate docs/results/level_stacking from runs/clinc_minilm_v2 and runs/banking77_minilm_v2:
nlcl's own report for each stream, and one side-by-side table of the new level-stacking runs next to
the baselines stored in docs/results/clinc_minilm and docs/results/banking77_minilm (their runs.csv:
the same experiment configs and seeds, run by an earlier commit; see report_head.md for why they
stand).

    python docs/results/level_stacking/make_report.py runs docs/results/level_stacking
"""
import sys
from pathlib import Path

import pandas as pd

from nlcl import report

HERE = Path(__file__).parent
STREAMS = {"clinc150": ("clinc_minilm_v2", "clinc_minilm"), "banking77": ("banking77_minilm_v2", "banking77_minilm")}
STORED = ["naive", "ewc_1e6", "replay", "frozen_head", "hope_levels"]  # variants taken from the stored runs
NEW = ["hope_stack", "periods_literal", "naive_cosine", "naive"]  # variants run for this report
METRICS = ["acc_final", "forgetting_max", "learning_accuracy", "acc_final_task_il"]


def cell(values) -> str:
    mean, _, half, n = report.mean_std_ci([100 * v for v in values])
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {half:.2f}"


def rows(stream: str, new: pd.DataFrame, stored: pd.DataFrame) -> list[str]:
    out = []
    for source, frame, variants in (("this report", new, NEW), ("stored", stored, STORED)):
        for v in variants:
            sub = frame[(frame["variant"] == v) & (frame["status"] == "finished")].sort_values("seed")
            if sub.empty:
                continue
            seeds = " / ".join(f"{100 * a:.2f}" for a in sub["acc_final"])
            out.append(f"| {stream} | {v} | {source} | {len(sub)} | " + " | ".join(cell(sub[m]) for m in METRICS)
                       + f" | {seeds} |")
    return out


if __name__ == "__main__":
    runs, out = Path(sys.argv[1]), Path(sys.argv[2])
    lines = ["| stream | variant | runs | n | acc_final | forgetting_max | learning_accuracy | acc_final_task_il | acc_final per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stream, (new_dir, stored_dir) in STREAMS.items():
        if not (runs / new_dir).is_dir():
            continue
        report.build_report([runs / new_dir], out / stream)
        new = pd.read_csv(out / stream / "runs.csv")
        stored = pd.read_csv(HERE.parent / stored_dir / "runs.csv")
        lines += rows(stream, new, stored)
    table = "\n".join(lines) + "\n"
    (out / "report.md").write_text((HERE / "report_head.md").read_text().replace("{{TABLE}}", table))
    print(table)
