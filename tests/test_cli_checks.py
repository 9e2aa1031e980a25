"""The CLI refuses a bad config before it imports torch or Lightning, checks every combination of a
sweep before its first run, and `--cfg job` validates like a run.

Speed is shown without a clock (no wall-clock assertions on a shared machine): a refused config
must leave torch and Lightning unimported, which is where the seconds went (docs/reliability.md
has the measured times)."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlcl.cli import main, sweep_jobs
from nlcl.config_checks import annotation_text
from nlcl.stream_signatures import stream_parameters
from nlcl.streams import STREAMS

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}

# run nlcl's CLI in a fresh interpreter and say which heavy modules it imported
PROBE = ("import json, sys; from nlcl.cli import main; code = main(sys.argv[1:]); "
         "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules, 'lightning': 'lightning' in sys.modules}))")


def _probe(tmp_path, *args):
    out = subprocess.run([sys.executable, "-c", PROBE, "run", *args], cwd=tmp_path, capture_output=True, text=True,
                         env=ENV, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr.strip()


@pytest.mark.parametrize("stream", sorted(STREAMS))
def test_stream_parameters_read_from_source_equal_the_imported_signature(stream):
    params = inspect.signature(STREAMS[stream]).parameters
    expected = {k: annotation_text(p) for k, p in params.items()}
    assert stream_parameters(stream) == expected


def test_stream_parameters_of_an_unknown_stream_is_none():
    assert stream_parameters("not_a_stream") is None


@pytest.mark.parametrize("args, field", [
    (["task.train_per_class=abc"], "task.train_per_class"),  # the fault report's 11-34 s traceback
    (["task.train_per_class=1.5"], "task.train_per_class"),
    (["model.n_heads=3"], "model.n_heads"),
    (["strategy=ewc", "strategy.ewc_lambda=-1"], "strategy.ewc_lambda"),
    (["+sed=3"], "sed"),
    (["trainer.accelerator=gpu"], "trainer.accelerator"),
])
def test_a_refused_config_imports_neither_torch_nor_lightning(tmp_path, args, field):
    if field == "trainer.accelerator" and any(Path("/dev").glob("nvidia*")):
        pytest.skip("this machine has a GPU device: whether torch can use it needs torch")
    result, err = _probe(tmp_path, *args)
    assert result == {"code": 2, "torch": False, "lightning": False}, err
    assert err.startswith(f"nlcl: error: {field}:") and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_a_value_only_the_builder_can_refuse_is_still_refused_by_the_cli(tmp_path):
    # SGD takes no betas: only building the optimizer can tell, so this one costs the torch import
    result, err = _probe(tmp_path, "optim=sgd", "+optim.betas=[0.9,0.99]", f"run_dir={tmp_path / 'r'}")
    assert result["code"] == 2 and err.startswith("nlcl: error: optim.betas: not an option of optimizer 'sgd'"), err
    assert not (tmp_path / "r").exists()


def test_cfg_job_refuses_what_a_run_refuses_and_prints_a_good_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", "optim=sgd", "+optim.betas=[0.9,0.99]", "--cfg", "job"],
                         cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("nlcl: error: optim.betas:"), out.stderr
    assert out.stdout == ""
    out = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", "strategy=ewc", "--cfg", "job"],
                         cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0 and "ewc_lambda:" in out.stdout, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # printed, not run


def test_sweep_jobs_are_hydras_product_in_order():
    jobs, swept = sweep_jobs(["strategy=naive,replay", "seed=0,1", "model.d_model=32"])
    assert jobs == [["strategy=naive", "seed=0", "model.d_model=32"], ["strategy=naive", "seed=1", "model.d_model=32"],
                    ["strategy=replay", "seed=0", "model.d_model=32"], ["strategy=replay", "seed=1", "model.d_model=32"]]
    assert swept == {"strategy", "seed"}
    jobs, _ = sweep_jobs(["seed=range(0,3)"])
    assert jobs == [["seed=0"], ["seed=1"], ["seed=2"]]


@pytest.mark.parametrize("sweep, bad", [
    (["model.n_heads=2,3"], "sweep run 1 of 2 (model.n_heads=3): model.n_heads: 3 heads must divide"),
    (["optim=adamw,sgd", "+optim.betas=[0.9,0.99]"],  # only the second combination's builder refuses it
     "sweep run 1 of 2 (optim=sgd): optim.betas: not an option of optimizer 'sgd'"),
    (["seed=0,1", "strategy=naive,ewc", "strategy.ewc_lambda=-1"], None),  # naive has no ewc_lambda: Hydra says so
])
def test_a_sweep_with_one_bad_combination_starts_no_run(tmp_path, capsys, sweep, bad):
    sweep_dir = tmp_path / "sweep"
    code = main(["run", "-m", f"hydra.sweep.dir={sweep_dir}", *sweep])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("nlcl: error: "), err
    if bad is not None:
        assert err == f"nlcl: error: {bad}" or err.startswith(f"nlcl: error: {bad}"), err
    else:
        assert "strategy.ewc_lambda" in err
    assert not sweep_dir.exists()  # nothing started, not even the sweep folder


def test_a_sweep_whose_runs_all_fail_exits_non_zero(tmp_path):
    # model.name=mlp is a registered model that cannot read text: each run fails when it builds it
    from tests.test_sweep import sweep_overrides

    sweep_dir = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "nlcl.cli", "run", "-m", f"hydra.sweep.dir={sweep_dir}",
                          *sweep_overrides("model.name=mlp", "seed=0,1", "trainer.epochs=1")],
                         cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    statuses = [json.loads(p.read_text())["status"] for p in sorted(sweep_dir.glob("*/results.json"))]
    assert statuses == ["failed", "failed"]
    assert "0 runs finished, 2 failed, 0 diverged" in out.stdout
