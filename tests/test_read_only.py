"""Read-only run folders, also when the tests run as root (who ignores permission bits): the folder
is made immutable with chattr +i there, which binds root too; chmod 555 otherwise.

- a run_dir under a read-only folder, or a read-only run_dir, is refused before any work, in one
  line naming it (exit 2), and nothing is created or changed;
- a folder that turns read-only while the run trains ends it with an OSError naming the file,
  and what the run had already written stays as it was.
"""
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest

from nlcl.config import compose, validate
from nlcl.runner import run
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def _set_read_only(path: Path, on: bool) -> None:
    if os.geteuid() == 0:
        out = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"running as root and chattr failed ({out.stderr.strip()}): root ignores permission "
                        "bits, so this filesystem offers no read-only folder to test with")
    else:
        path.chmod(0o555 if on else 0o755)


@contextmanager
def read_only(path: Path):
    _set_read_only(path, True)
    try:
        yield path
    finally:
        _set_read_only(path, False)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nlcl.cli", "run", *args], capture_output=True, text=True,
                          env=ENV, timeout=300, cwd=REPO)


def test_read_only_is_real_here(tmp_path):
    """The helper binds this user: otherwise the tests below would pass without testing anything."""
    with read_only(tmp_path):
        with pytest.raises(OSError):
            (tmp_path / "x").write_text("x")


def test_a_run_dir_under_a_read_only_folder_is_refused_before_any_work(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    with read_only(parent):
        out = _cli(*tiny_overrides(parent / "run"))
        assert not (parent / "run").exists()
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip()
    assert line.startswith(f"nlcl: error: run_dir: '{parent / 'run'}' cannot be written") and "\n" not in line
    assert "read-only" in line and "nothing was run" in line


def test_a_read_only_run_folder_is_refused_and_left_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("kept")
    before = _snapshot(run_dir)
    with read_only(run_dir):
        out = _cli(*tiny_overrides(run_dir))
    assert out.returncode == 2 and "run_dir:" in out.stderr and "read-only" in out.stderr, out.stderr[-2000:]
    assert _snapshot(run_dir) == before


class _FreezeCheckpoints(L.Callback):
    """When experience 1 starts training, the run's checkpoint folder turns read-only."""

    def __init__(self, folder: Path):
        self.folder, self.frozen = folder, False

    def on_train_start(self, trainer, learner):
        if learner.experience == 1 and not self.frozen:
            _set_read_only(self.folder, True)
            self.frozen = True


def test_a_folder_that_turns_read_only_mid_run_stops_it_naming_the_file_and_keeps_what_was_written(tmp_path):
    run_dir = tmp_path / "run"
    cfg = validate(compose(tiny_overrides(run_dir, "+task.first_experiences=2", "trainer.epochs=1")))
    freeze = _FreezeCheckpoints(run_dir / "checkpoints")
    try:
        with pytest.raises(OSError) as err:
            run(cfg, callbacks=[freeze], quiet=True)
        assert freeze.frozen
        assert str(run_dir / "checkpoints") in str(err.value)  # names the place it could not write
        kept = _snapshot(run_dir / "checkpoints")
        assert kept and all(kept.values())  # experience 0's checkpoint is there, whole
        assert not (run_dir / "results.json").exists()
    finally:
        if freeze.frozen:
            _set_read_only(run_dir / "checkpoints", False)
    shutil.rmtree(run_dir)
