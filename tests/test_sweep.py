"""A real Hydra multirun through the CLI: one folder per combination, a failing combination is
recorded as failed while the others finish, and `nlcl report` aggregates the sweep."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nlcl.report import main as report_main
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def sweep_overrides(*extra):
    """The tiny run of conftest, shorter still (2 experiences, 1 epoch, 4 queries per intent);
    without run_dir, which a sweep derives from hydra.sweep.dir."""
    shorter = {"trainer.epochs": "1", "task.train_per_class": "4", "task.test_per_class": "4"}
    base = [o for o in tiny_overrides("unused") if not o.startswith("run_dir=")]
    base = [f"{o.split('=')[0]}={shorter.get(o.split('=')[0], o.split('=', 1)[1])}" for o in base]
    return [*base, "+task.first_experiences=2", *extra]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "grid"
    # model.name=mlp passes validation (a registered model) but cannot read text: it fails when the
    # run builds its model, for both strategies and both seeds
    cmd = [sys.executable, "-m", "nlcl.cli", "run", "-m", f"hydra.sweep.dir={sweep_dir}",
           *sweep_overrides("strategy=naive,replay", "seed=0,1", "model.name=transformer,mlp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return sweep_dir, out


def _runs(sweep_dir):
    return {p.name: json.loads((p / "results.json").read_text())
            for p in sorted(sweep_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def test_one_folder_per_combination(sweep):
    sweep_dir, _ = sweep
    runs = _runs(sweep_dir)
    assert len(runs) == 8, sorted(runs)
    combos = {(r["model"], r["strategy"], r["seed"]) for r in runs.values()}
    assert combos == {(m, s, seed) for m in ("transformer", "mlp") for s in ("naive", "replay") for seed in (0, 1)}
    for name, r in runs.items():  # the folder name says which run it is
        assert f"_{r['model']}_{r['strategy']}_" in name and name.endswith(f"_s{r['seed']}")
        assert (sweep_dir / name / ".hydra" / "overrides.yaml").exists()


def test_failing_combination_is_recorded_and_the_sweep_goes_on(sweep):
    sweep_dir, out = sweep
    runs = _runs(sweep_dir)
    failed = {n: r for n, r in runs.items() if r["status"] == "failed"}
    finished = {n: r for n, r in runs.items() if r["status"] == "finished"}
    assert {r["model"] for r in failed.values()} == {"mlp"} and len(failed) == 4
    for r in failed.values():
        assert "image" in r["error"] and r["traceback"] and r["config"]["model"]["name"] == "mlp"
    assert len(finished) == 4
    for name, r in finished.items():
        assert len(r["accuracy_matrix"]) == 3 and len(r["accuracy_matrix"][0]) == 2  # init + 2 experiences
        assert (sweep_dir / name / "accuracy_matrix.png").exists()
    job = lambda name: int(re.match(r"j(\d+)_", name).group(1))  # noqa: E731
    assert max(map(job, finished)) > min(map(job, failed))  # runs after a failure still ran
    assert "failed" in out.stderr and "recorded in" in out.stderr
    assert f"4 runs finished, 4 failed, 0 diverged, in {sweep_dir}" in out.stdout
    assert f"nlcl report {sweep_dir}" in out.stdout


def test_report_of_the_sweep(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    assert report_main([str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    assert text.count("left out (failed)") == 4
    table = [line for line in text.splitlines() if line.strip().startswith(("naive", "replay"))]
    assert len(table) == 2 and all(" 2 " in line for line in table)  # two seeds per strategy
    assert (tmp_path / "report" / "accuracy_matrices.png").stat().st_size > 0
