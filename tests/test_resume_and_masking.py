"""Resume that a user can guess (Ctrl-C says what was saved and the command that resumes; that
command, and the one `nlcl report` suggests, really resume) and trainer.mask_unseen from config."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from nlcl.config import compose, validate
from nlcl.report import load_runs
from nlcl.runner import build_parts

REPO = Path(__file__).resolve().parent.parent


def _csv(path: Path, n_classes=6, per_class=40) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for c in range(n_classes):
            w.writerows([f"class {c} example {k}", f"c{c}"] for k in range(per_class))
    return path


def test_mask_unseen_from_config_acts_on_the_training_loss(tmp_path):
    data = _csv(tmp_path / "d.csv")
    grads = {}
    for masked in ("true", "false"):
        cfg = validate(compose([f"run_dir={tmp_path / 'r'}", "task=files", f"task.path={data}", "task.n_experiences=3",
                                f"trainer.mask_unseen={masked}", "model.d_model=16", "model.n_layers=1",
                                "model.n_heads=2"]))
        parts = build_parts(cfg)
        learner, exp = parts.learner, parts.stream.experiences[0]
        learner.start_experience(0, exp.classes)
        x, y = exp.train.x[:16], exp.train.y[:16]
        learner.task_loss(learner(x), y).backward()
        grads[masked] = learner.model.head.bias.grad.clone()
    unseen = [c for c in range(6) if c not in parts.stream.experiences[0].classes]
    assert torch.all(grads["true"][unseen] == 0)  # masked: unseen classes get no gradient
    assert torch.all(grads["false"][unseen] > 0)  # unmasked (avalanche's default): pushed down


def test_ctrl_c_says_what_was_saved_and_its_command_resumes(tmp_path):
    data = _csv(tmp_path / "d.csv")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO)}
    args = ["task=files", f"task.path={data}", "task.n_experiences=3", "model.d_model=16", "model.n_layers=1",
            "model.n_heads=2", "trainer.epochs=25", "trainer.progress_bar=false", "logger=csv"]
    proc = subprocess.Popen([sys.executable, "-m", "nlcl.cli", "run", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    for line in proc.stdout:  # wait until experience 0 is saved, then press Ctrl-C in experience 1
        if line.startswith("[nlcl] experience 0 ") or time.time() > deadline:
            break
    while not list(tmp_path.glob("runs/*/*/checkpoints/state.pt")) and time.time() < deadline:
        time.sleep(0.05)  # the state is written right after that line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: 1 finished experience saved in" in err, err[-3000:]
    command = err.split("resume this run with:\n")[1].splitlines()[0].strip()
    assert command.startswith("nlcl run ") and "run_dir=" in command
    run_dir = Path(shlex.split(command)[-1].removeprefix("run_dir="))
    if not run_dir.is_absolute():
        run_dir = tmp_path / run_dir

    # the report suggests the same command for the unfinished run
    _, left_out = load_runs([tmp_path / "runs"])
    assert [r["status"] for r in left_out] == ["incomplete"] and command in left_out[0]["error"]

    # running it resumes after experience 0 and finishes
    resumed = subprocess.run([sys.executable, "-m", "nlcl.cli", *shlex.split(command)[1:]],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "after experience 0 (1/3 done)" in resumed.stdout, resumed.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
