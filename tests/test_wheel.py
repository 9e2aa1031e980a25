"""nlcl as a library: the built wheel carries its configs and runs a stream outside the repository.

The wheel is installed into a fresh virtual environment that sees the test interpreter's packages
through a .pth file (so torch is not downloaded again); the run happens in a folder outside the
checkout, and the test checks that `nlcl` was imported from the fresh environment, not the checkout.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _sh(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    # build from a copy of the sources: setuptools writes build/ beside them
    src = tmp_path / "src"
    shutil.copytree(REPO / "nlcl", src / "nlcl", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    dist = tmp_path / "dist"
    # --no-build-isolation: setuptools comes from this environment, nothing is fetched
    _sh([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        cwd=tmp_path)
    wheel = next(dist.glob("nlcl-*.whl"))

    venv = tmp_path / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the test interpreter's packages (torch, lightning, hydra, pip ...), after the venv's own; a path
    # in a .pth file does not run the .pth files inside it, so an editable nlcl there stays invisible
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)])

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", NLCL_DATA=str(REPO.parent / "shared" / "data"))
    where = _sh([str(py), "-c", "import nlcl.config as c; print(c.__file__); print(c.config_dir())"], cwd=work, env=env)
    module, conf = where.stdout.split()
    assert module.startswith(str(site)) and conf.startswith(str(site)), where.stdout  # not the checkout
    assert (Path(conf) / "task" / "clinc150.yaml").is_file()

    run_dir = work / "run"
    _sh([str(venv / "bin" / "nlcl"), "run", f"run_dir={run_dir}", "task.train_per_class=4", "task.test_per_class=4",
         "+task.first_experiences=2", "task.max_len=24", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
         "trainer.epochs=1", "trainer.progress_bar=false", "logger=csv"], cwd=work, env=env)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and len(results["accuracy_matrix"]) == 3
