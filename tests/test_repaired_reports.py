"""docs/results/repaired: the stability-gap numbers from step-granular curves, and the telemetry
summary next to every configuration, on hand-made runs whose answers are known."""
import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent / "docs" / "results" / "repaired"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


gap = _load("stability_gap")
reports = _load("make_reports")


def _point(step, experience, scores):
    return {"step": step, "experience": experience, "scores": scores}


def test_gap_recovery_and_time_to_the_lowest_point():
    curves = [
        _point(2, 0, [0.5, 0.0, 0.0]), _point(4, 0, [0.8, 0.0, 0.0]),  # before experience 1: 0.8 on exp 0
        _point(6, 1, [0.3, 0.4, 0.0]), _point(8, 1, [0.2, 0.7, 0.0]), _point(10, 1, [0.6, 0.9, 0.0]),
        # experience 2: old = mean of exps 0 and 1; before 0.75, lowest 0.25, end 0.5
        _point(12, 2, [0.3, 0.2, 0.5]), _point(14, 2, [0.4, 0.6, 0.8]),
    ]
    g = gap.gap_of_run(curves)
    assert g["gap"] == pytest.approx(((0.8 - 0.2) + (0.75 - 0.25)) / 2)
    assert g["recovery"] == pytest.approx(((0.6 - 0.2) + (0.5 - 0.25)) / 2)
    assert g["steps_to_lowest"] == pytest.approx((2 + 0) / 2) and g["points"] == 7


def test_mechanism_summary_averages_experiences_and_names_the_slowest_level():
    layer = lambda w, f: {"writes_per_sequence/k": w, "negative_eigenvalue_fraction": f}  # noqa: E731
    run = {"mechanism_telemetry": [{"experience": 0, "layers": {"b.0": layer(1.0, 0.1), "b.1": layer(9.0, 0.9)}},
                                   {"experience": 1, "layers": {"b.0": layer(3.0, 0.3), "b.1": layer(9.0, 0.9)}}],
           "level_telemetry": {"outer": {"updates": 100}, "cms0_p1": {"updates": 100, "relative_step": 1.0},
                               "cms2_p64": {"updates": 2, "relative_step": 0.5},
                               "cms1_p8": {"updates": 12, "relative_step": 0.8}}}
    text = reports.mechanism([run])
    assert text == "k writes/seq 2.0, negative eigenvalues 20.0%; slowest level 2 updates, relative step 0.50"
    assert reports.mechanism([{"level_telemetry": {"outer": {"updates": 5}}}]) == "-"


def test_rows_without_run_folders_keep_their_stored_lines(tmp_path):
    """A checkout has the reports, not the runs: regenerating with no run folder for a row keeps
    that row's last generated lines (here every row), in ROWS order, under the table's header."""
    import shutil

    out = tmp_path / "repaired"
    for row in reports.ROWS:
        if (HERE / row / "summary_rows.md").exists():
            (out / row).mkdir(parents=True)
            shutil.copy(HERE / row / "summary_rows.md", out / row / "summary_rows.md")
    (tmp_path / "runs").mkdir()
    table = reports.main(tmp_path / "runs", out)
    stored = [line for row in reports.ROWS if (HERE / row / "summary_rows.md").exists()
              for line in (HERE / row / "summary_rows.md").read_text().splitlines()]
    assert table.splitlines()[2:] == stored and len(stored) >= 20
    assert "| clinc_scratch | hope |" in (out / "report.md").read_text()
