"""One bad results.json never breaks a report, and no name writes markup into it."""
import json

import pytest

from nlcl.report import build_report, load_runs, main
from tests.test_report import write_run

BAD = {  # folder -> (how the results.json is damaged, what the reason must say)
    "torn": (lambda text: text[: len(text) // 2], "unreadable"),
    "shape": (lambda text: text.replace("[0.1, 0.0], ", ""), "accuracy_matrix has shape"),
    "percent": (lambda text: text.replace("0.7]]", "16.7]]"), "outside [0, 1]"),
    "infinite": (lambda text: text.replace('"acc_final": 0.5', '"acc_final": Infinity'), "metrics.acc_final"),
    "nan_cell": (lambda text: text.replace("0.8, 0.0]", "NaN, 0.0]"), "not a finite number"),
    "string_cell": (lambda text: text.replace("0.8, 0.0]", '"0.8", 0.0]'), "not a finite number"),
    "seed_type": (lambda text: text.replace('"seed": 7', '"seed": "zero"'), "seed is 'zero'"),
    "status": (lambda text: text.replace('"status": "finished"', '"status": "done"'), "status 'done'"),
    "not_object": (lambda text: "[1, 2, 3]", "not a JSON object"),
    "empty": (lambda text: "", "unreadable"),
}


@pytest.fixture
def damaged(tmp_path):
    root = tmp_path / "sweep"
    for seed, acc in ((0, 0.5), (1, 0.6)):
        write_run(root / f"good_s{seed}", seed=seed, acc_final=acc)
    for name, (damage, _) in BAD.items():
        f = write_run(root / name, seed=7, acc_final=0.5) / "results.json"
        f.write_text(damage(f.read_text()))
    return root


def test_every_bad_file_is_listed_with_path_and_reason_and_the_rest_is_reported(damaged, tmp_path, capsys):
    runs, left_out = load_runs([damaged])
    assert sorted(r["run_dir"].split("/")[-1] for r in runs) == ["good_s0", "good_s1"]
    reasons = {r["run_dir"].split("/")[-1]: r for r in left_out}
    assert set(reasons) == set(BAD)
    for name, (_, why) in BAD.items():
        assert reasons[name]["status"] == "invalid"
        assert str(damaged / name / "results.json") in reasons[name]["error"] and why in reasons[name]["error"], name
    assert main([str(damaged), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert text.count("left out (invalid)") == len(BAD)
    assert "55.00 ± " in text  # the two good seeds, 50% and 60%


def test_names_cannot_write_markup_into_the_report(tmp_path):
    root = tmp_path / "evil"
    evil = "x\n# owned\n<script>alert(1)</script>|[link](http://e)`"
    for seed in (0, 1):
        write_run(root / f"s{seed}", seed=seed, model=evil, acc_final=0.5,
                  experiences=[{"name": "<b>e0</b>"}, {"name": "`e1`"}])
    write_run(root / "failed", seed=2, model=evil, status="failed")
    rep = build_report([root], tmp_path / "out", plots=True)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "<script>" not in md and "<b>" not in md
    assert [line for line in md.splitlines() if line.startswith("#")] == [
        line for line in md.splitlines() if line.startswith(("# nlcl report", "## "))]
    assert "[link](" not in md.replace("\\[link\\](", "")
    assert rep.runs and all(p.stat().st_size > 0 for p in rep.files)


def test_quotes_in_an_error_message_read_as_written():
    from nlcl.report import md_text

    text = md_text("non-finite gradient of level 'outer' (\"task\")")
    assert text == "non-finite gradient of level 'outer' (\"task\")"
    assert md_text("a <b> & # c") == "a &lt;b&gt; &amp; \\# c"


def test_a_run_with_non_finite_values_written_by_nlcl_stays_valid_json(tmp_path):
    from nlcl.results import atomic_write_json

    path = tmp_path / "r.json"
    atomic_write_json(path, {"metrics": {"fwt": float("nan"), "ok": 1.0}, "R": [[float("inf")]]})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert data["metrics"] == {"fwt": None, "ok": 1.0} and data["R"] == [[None]]
    assert data["non_finite"] == {"metrics.fwt": "nan", "R[0][0]": "inf"}
