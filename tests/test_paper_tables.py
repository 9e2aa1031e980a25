"""docs/results/paper_tables.py: the per-seed pairing of ablations and the Bin0 / Bin1 cells."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "paper_tables", Path(__file__).resolve().parent.parent / "docs" / "results" / "paper_tables.py")
paper_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_tables)


def _run(variant, seed, ppl):
    return {"variant": variant, "seed": seed, "metrics": {"acc_final": ppl}, "settings": {}}


def test_ablation_changes_are_paired_by_seed():
    runs = [_run("hope", 0, 9.0), _run("hope", 1, 8.0), _run("gd", 0, 9.5), _run("gd", 1, 7.9)]
    row = [line for line in paper_tables.ablations(runs).splitlines() if line.startswith("| GD")][0]
    # mean change (8.70 - 8.50) and the per-seed differences (+0.50, -0.10), not a cross-seed one
    assert "+0.200 (+0.50 / -0.10)" in row and "| 13.41 | +1.17 |" in row


def test_formal_cells_show_bin0_and_bin1():
    run = {"model": "hope", "settings": {"task.languages": '["parity"]'},
           "metrics": {"acc_final": 0.255, "eval_bin1": 0.0}}
    hope = [line for line in paper_tables.formal([run]).splitlines() if line.startswith("| hope (nlcl)")][0]
    assert hope.split("|")[2].strip() == "25.5 / 0.0" and hope.count(" - ") == 5


def test_formal_cells_average_over_seeds():
    runs = [{"model": "hope", "settings": {"task.languages": '["parity"]'},
             "metrics": {"acc_final": a, "eval_bin1": b}} for a, b in [(1.0, 0.5), (0.9, 0.3), (0.8, 0.1)]]
    hope = [line for line in paper_tables.formal(runs).splitlines() if line.startswith("| hope (nlcl)")][0]
    assert hope.split("|")[2].strip() == "90.0 [80-100] / 30.0 [10-50] (n=3)"
