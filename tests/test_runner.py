"""The engine end to end: a real Lightning run on real data, resume after a kill, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from nlcl.config import ConfigError, compose, validate
from nlcl.results import safe_torch_load
from nlcl.runner import STATE_FILE, run
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def _cfg(run_dir, *extra):
    return validate(compose(tiny_overrides(run_dir, *extra)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "naive"
    return run(_cfg(run_dir), quiet=True), run_dir


def test_run_writes_every_result(finished_run):
    res, run_dir = finished_run
    for name in ("config.yaml", "results.json", "metrics.csv", "accuracy_matrix.png", STATE_FILE):
        assert (run_dir / name).exists(), name
    on_disk = json.loads((run_dir / "results.json").read_text())
    R = on_disk["accuracy_matrix"]
    assert len(R) == 11 and all(len(row) == 10 for row in R)  # before-training row + 10 experiences
    assert len(on_disk["accuracy_matrix_task_il"]) == 11
    for key in ("acc_final", "acc_avg_incremental", "bwt", "fwt", "forgetting_max", "forgetting_first",
                "learning_accuracy"):
        assert key in on_disk["metrics"]
    assert [e["name"] for e in on_disk["experiences"]][:2] == [e["name"] for e in res["experiences"]][:2]
    assert on_disk["versions"]["torch"] == torch.__version__


def test_every_experience_trains_and_steps_are_monotone(finished_run):
    res, run_dir = finished_run
    steps = [t["steps"] for t in res["timings"]["experiences"]]
    assert all(s > 0 for s in steps), steps  # a second fit on a finished Trainer would train 0 steps
    assert res["total_steps"] == sum(steps)
    logged = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    step_col = header.index("step")
    logged_steps = [int(float(line.split(",")[step_col])) for line in logged[1:] if line.split(",")[step_col]]
    assert logged_steps == sorted(logged_steps) and max(logged_steps) == res["total_steps"]


def test_class_il_is_harder_than_task_il_and_future_is_zero(finished_run):
    res, _ = finished_run
    R, R_til = torch.tensor(res["accuracy_matrix"]), torch.tensor(res["accuracy_matrix_task_il"])
    assert torch.all(R_til >= R - 1e-9)  # masking to fewer classes can only help
    # class-IL: experiences not yet seen cannot be predicted at all
    for i in range(1, 10):
        assert torch.all(R[i, i:] == 0)
    # each experience is learned when it is trained on: task-IL accuracy right after learning is
    # well above its chance level of 1/15 (15 intents per experience)
    assert R_til[1, 0] > 2 / 15
    assert res["metrics"]["learning_accuracy_task_il"] > 1.5 / 15


SHORT = ("+task.first_experiences=4",)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return run(_cfg(tmp_path_factory.mktemp("short") / "run", *SHORT), quiet=True)


def test_resume_after_failure_gives_same_matrix(short_run, tmp_path):
    res = short_run
    assert len(res["accuracy_matrix"]) == 5
    run_dir = tmp_path / "resumed"

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if pl_module.experience == 2 and batch_idx == 3:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_cfg(run_dir, *SHORT), callbacks=[Crash()], quiet=True)
    state = safe_torch_load(run_dir / STATE_FILE)
    assert len(state["R_cil"]) == 3  # before-row + experiences 0 and 1 finished
    assert not (run_dir / "results.json").exists()
    resumed = run(_cfg(run_dir, *SHORT), quiet=True)
    assert resumed["accuracy_matrix"] == res["accuracy_matrix"]
    assert resumed["total_steps"] == res["total_steps"]


def test_sigkill_leaves_a_resumable_state(short_run, tmp_path):
    """A real process killed with SIGKILL mid-stream: what it wrote stays readable and resumes exactly."""
    res = short_run
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "nlcl.cli", "run", *tiny_overrides(run_dir, *SHORT)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    state_path = run_dir / STATE_FILE
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state_path.exists() and len(safe_torch_load(state_path)["R_cil"]) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state_path.exists()
    assert len(safe_torch_load(state_path)["R_cil"]) < 5  # killed before the end
    resumed = run(_cfg(run_dir, *SHORT), quiet=True)
    assert resumed["accuracy_matrix"] == res["accuracy_matrix"]


def test_resume_refuses_a_different_config(finished_run, tmp_path):
    _, run_dir = finished_run
    with pytest.raises(ValueError, match="different configuration"):
        run(_cfg(run_dir, "optim.lr=0.5"), quiet=True)


@pytest.mark.parametrize("override, field", [
    ("model.name=nosuchmodel", "model.name"),
    ("strategy.name=nosuch", "strategy.name"),
    ("task.stream=nosuch", "task.stream"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("optim.lr=-1", "optim.lr"),
])
def test_bad_config_names_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(compose(tiny_overrides(tmp_path / "x", override)))
    assert not (tmp_path / "x").exists()  # nothing written


def test_bad_model_field_fails_before_writing(tmp_path):
    cfg = _cfg(tmp_path / "x", "+model.no_such_field=3")
    with pytest.raises(ValueError, match="no_such_field"):
        run(cfg, quiet=True)
    assert not (tmp_path / "x").exists()


def test_cli_reports_bad_input_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", *tiny_overrides(tmp_path / "y", "strategy.name=bogus")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert "strategy.name" in out.stderr and "bogus" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("model", ["hope", "hope_attention", "titans", "hope_no_cms", "hope_no_dgd"])
def test_every_family_plugs_into_the_runner(tmp_path, model):
    """Models are chosen by name only; the learner and runner do not change."""
    res = run(_cfg(tmp_path / model, f"model={model}", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                   "+task.first_experiences=2", "task.train_per_class=4", "trainer.epochs=1"), quiet=True)
    assert res["model"] == model and len(res["accuracy_matrix"]) == 3
    assert all(t["steps"] > 0 for t in res["timings"]["experiences"])
    if model in ("hope", "hope_attention", "hope_no_dgd"):  # CMS levels show up as optimizer levels
        assert {"cms0_p1", "cms1_p8", "cms2_p64"} <= set(res["level_telemetry"])


def test_step_granular_evaluation_records_curves(tmp_path):
    res = run(_cfg(tmp_path / "curves", "+task.first_experiences=2", "trainer.eval_every_n_steps=5",
                   "trainer.eval_subsample=20"), quiet=True)
    curves = res["curves"]
    assert [c["step"] for c in curves] == list(range(5, res["total_steps"] + 1, 5))
    assert all(len(c["scores"]) == 2 for c in curves)
    # the experience index follows training, and the unseen experience scores 0 in class-IL
    first = [c for c in curves if c["experience"] == 0]
    assert first and all(c["scores"][1] == 0 for c in first)
    assert any(c["experience"] == 1 for c in curves)


def test_failed_attempt_never_replaces_a_finished_result(finished_run):
    """Re-running a finished folder with another config fails, and the finished result stays."""
    _, run_dir = finished_run
    before = (run_dir / "results.json").read_text()
    out = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", "-m", *tiny_overrides(run_dir, "optim.lr=0.5")],
                         cwd=REPO, capture_output=True, text=True)
    assert "different configuration" in out.stderr
    assert (run_dir / "results.json").read_text() == before
    assert json.loads((run_dir / "failure.json").read_text())["status"] == "failed"
