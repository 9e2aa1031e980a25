"""No lost data: logs survive a kill and a resume, checkpoints are verified, one run per folder."""
import csv
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nlcl.checkpoint_io import CheckpointError, encode, load
from nlcl.config import compose, validate
from nlcl.evaluate import evaluate_run
from nlcl.results import atomic_torch_save, safe_torch_load
from nlcl.run_lock import LOCK_NAME, RunDirLocked, hold_run_dir
from nlcl.runner import STATE_FILE, run
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
SHORT = ("+task.first_experiences=3", "trainer.log_every=2")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _overrides(run_dir, *extra, epochs=1):
    return [o for o in tiny_overrides(run_dir, *SHORT, *extra) if not o.startswith("trainer.epochs=")] + \
        [f"trainer.epochs={epochs}"]


def _cfg(run_dir, *extra):
    return validate(compose(_overrides(run_dir, *extra)))


def _sizes(run_dir: Path) -> dict:
    # the lock file names its current holder (pid, host, time): metadata, not data; a
    # ".<name>.<random>.tmp" is an atomic write a kill interrupted (its target is intact and the
    # resume removes it): not data either
    return {str(p.relative_to(run_dir)): p.stat().st_size for p in run_dir.rglob("*")
            if p.is_file() and p.name != LOCK_NAME and not (p.name.startswith(".") and p.name.endswith(".tmp"))}


def _start(run_dir, *extra, epochs=1):
    return subprocess.Popen([sys.executable, "-m", "nlcl.cli", "run", *_overrides(run_dir, *extra, epochs=epochs)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_experiences(proc, run_dir, n, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        state = run_dir / STATE_FILE
        if state.exists() and len(safe_torch_load(state)["R_cil"]) >= n + 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"run did not finish {n} experiences: {proc.poll()}")


def test_kill_resume_rerun_never_shrinks_a_file_and_keeps_every_log_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for_experiences(proc, run_dir, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _sizes(run_dir)
    log = run_dir / "logs" / "metrics.csv"
    first_attempt = log.read_text().splitlines()
    assert len(first_attempt) > 2
    # the dead run's lock is left behind naming it; the resume takes it over (stale lock recovery)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == proc.pid
    run(_cfg(run_dir), quiet=True)
    resumed = _sizes(run_dir)
    assert not list(run_dir.rglob(".*.tmp"))  # an interrupted atomic write's leftover is cleaned up
    run(_cfg(run_dir), quiet=True)  # a re-run of a finished run
    rerun = _sizes(run_dir)
    for before, after in ((killed, resumed), (resumed, rerun)):
        shrunk = {f: (before[f], after.get(f)) for f in before if after.get(f, -1) < before[f]}
        assert not shrunk, shrunk
    lines = log.read_text().splitlines()
    assert lines[0].split(",") == sorted(lines[0].split(","))  # one header, every column
    assert sum(line == lines[0] for line in lines) == 1

    def steps(text):
        return [int(float(r["step"])) for r in csv.DictReader(io.StringIO(text)) if r["step"]]

    first_steps, all_steps = steps("\n".join(first_attempt)), steps(log.read_text())
    assert all_steps[: len(first_steps)] == first_steps and len(all_steps) > len(first_steps)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fin") / "run"
    run(_cfg(run_dir), quiet=True)
    return run_dir


def _copy(finished, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(finished, dst)
    return dst


def _rng_flips(data: bytes, n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        i = rng.randrange(len(data))
        b = bytearray(data)
        b[i] ^= 1 << rng.randrange(8)
        yield i, bytes(b)


def test_every_single_bit_flip_is_detected(finished, tmp_path):
    data = (finished / STATE_FILE).read_bytes()
    for i, flipped in _rng_flips(data, 40):
        path = tmp_path / "state.pt"
        path.write_bytes(flipped)
        with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
            load(path)


class Gadget:  # nlcl never saves objects like this: a weights-only load must refuse it
    pass


@pytest.mark.parametrize("damage", ["truncated", "random", "bitflip", "pickled_code", "foreign", "empty"])
def test_damaged_checkpoint_is_refused_by_name_and_nothing_finished_changes(finished, tmp_path, damage):
    run_dir = _copy(finished, tmp_path)
    state = run_dir / STATE_FILE
    data = state.read_bytes()
    if damage == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        state.write_bytes(random.Random(1).randbytes(len(data)))
    elif damage == "bitflip":
        state.write_bytes(next(_rng_flips(data, 1, seed=3))[1])
    elif damage == "pickled_code":
        torch.save({"fingerprint": "x", "payload": Gadget()}, state, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    elif damage == "foreign":
        atomic_torch_save(state, {"weights": torch.ones(2)})
    elif damage == "empty":
        state.write_bytes(b"")
    before = {f: (run_dir / f).read_bytes() for f in ("results.json", "metrics.csv", "config.yaml")}
    with pytest.raises(CheckpointError) as err:
        run(_cfg(run_dir), quiet=True)
    message = str(err.value)
    assert str(state) in message and "\n" not in message and "nothing in the run folder was changed" in message
    if damage == "pickled_code":
        assert "pickled code" in message and "must not be loaded with weights_only=False" in message
    with pytest.raises(CheckpointError):  # evaluate verifies the same way
        evaluate_run(run_dir, [], "again")
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    assert not (run_dir / "evaluations").exists()


def test_cli_answers_a_corrupt_checkpoint_in_one_line(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    (run_dir / STATE_FILE).write_bytes((run_dir / STATE_FILE).read_bytes()[:-10])
    before = (run_dir / "results.json").read_bytes()
    out = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", *_overrides(run_dir)], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("nlcl: error:")] == [
        line for line in out.stderr.splitlines() if "truncated checkpoint" in line]
    assert (run_dir / "results.json").read_bytes() == before


def test_evaluate_checks_the_config_fingerprint(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    assert evaluate_run(run_dir, [], "same")["mean"] >= 0  # the untouched copy evaluates
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.003", "lr: 0.3"))
    with pytest.raises(CheckpointError, match="another configuration"):
        evaluate_run(run_dir, [], "other")


def test_checkpoints_written_before_checksums_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"a": torch.arange(3)}, path)
    assert load(path)["a"].tolist() == [0, 1, 2]
    assert encode({"a": 1}).startswith(b"NLCL-CHECKPOINT 1 ")


def test_a_held_folder_refuses_a_second_run_naming_the_holder(tmp_path):
    run_dir = tmp_path / "held"
    with hold_run_dir(run_dir):
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} on host"):
            run(_cfg(run_dir), quiet=True)
    assert not (run_dir / "config.yaml").exists()
    with hold_run_dir(run_dir):  # released on exit: it can be taken again
        pass


def test_two_concurrent_starts_on_one_folder(tmp_path):
    run_dir = tmp_path / "shared"
    first = _start(run_dir, "seed=0", epochs=500)  # still training when the second has started and gone
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "config.yaml").exists():
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", *_overrides(run_dir, "seed=1")],
                                cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
        assert first.poll() is None  # the first one held the folder the whole time
    finally:
        first.kill()
        first.communicate()
    assert second.returncode == 2 and f"in use by pid {first.pid} on host" in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert "seed: 0" in (run_dir / "config.yaml").read_text()  # nothing of the second run was written
    assert not (run_dir / "results.json").exists()


def test_leftover_temporary_files_are_cleaned_on_the_next_start(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    leftovers = [run_dir / ".results.json.k2j3.tmp", run_dir / "checkpoints" / ".state.pt.x81a.tmp"]
    for f in leftovers:
        f.write_bytes(b"half a write")
    run(_cfg(run_dir), quiet=True)
    assert not any(f.exists() for f in leftovers)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"


def test_a_full_disk_is_found_before_training(tmp_path):
    from nlcl.checkpoint_io import ensure_space

    with pytest.raises(OSError, match=f"{tmp_path}: .* MiB free, a checkpoint needs about"):
        ensure_space(tmp_path, torch.nn.Linear(4, 4), factor=10**15)
    ensure_space(tmp_path, torch.nn.Linear(4, 4))  # a small model fits


def test_unsafe_yaml_is_refused_in_one_line_and_never_run(finished, tmp_path):
    from nlcl.config import ConfigError
    from nlcl.report import load_runs

    run_dir = _copy(finished, tmp_path)
    marker = tmp_path / "executed"
    (run_dir / "config.yaml").write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not plain YAML") as err:
        evaluate_run(run_dir, [], "x")
    assert str(run_dir / "config.yaml") in str(err.value) and "\n" not in str(err.value)
    runs, left_out = load_runs([run_dir])
    assert not runs and left_out[0]["status"] == "invalid" and "not plain YAML" in left_out[0]["error"]
    assert not marker.exists()


def test_cfg_job_validates_like_a_run_and_a_given_run_dir_leaves_no_adhoc_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", "trainer.epochs=1.5", "--cfg", "job"],
                         cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert out.returncode == 2 and out.stderr.strip() == "nlcl: error: trainer.epochs: expected an integer, got 1.5"
    assert not (tmp_path / "runs").exists()
    out = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", "model.n_heads=3", f"run_dir={tmp_path / 'r'}"],
                         cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert out.returncode == 2 and "model.n_heads: 3 heads must divide model.d_model=128" in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r").exists()
