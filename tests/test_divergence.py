"""Divergence is an outcome: a run that goes non-finite stops, says where, and is never a success."""
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from nlcl.config import compose, validate
from nlcl.divergence import Diverged
from nlcl.runner import STATE_FILE, run
from nlcl.strategies.regularization import EWC
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
BLOW_UP = ("optim=sgd", "optim.lr=1e4", "trainer.gradient_clip=null", "+task.first_experiences=1", "trainer.epochs=1")


def _cfg(run_dir, *extra):
    return validate(compose(tiny_overrides(run_dir, *extra)))


FAMILIES = {  # every model family, each on a stream it reads, small enough for a test
    "transformer": (), "hope": ("model=hope",), "hope_attention": ("model=hope_attention",),
    "titans": ("model=titans",), "lstm": ("model=lstm", "~model.n_heads"),
    "hope_incontext": ("model=hope_incontext",),
    "mlp": ("task=split_mnist", "model=mlp", "~task.max_len", "~model.d_model", "~model.n_layers", "~model.n_heads",
            "task.train_per_class=20", "task.test_per_class=5", "model.hidden=16"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_model_family_stops_when_it_diverges(family, tmp_path):
    run_dir = tmp_path / family
    overrides = [o for o in tiny_overrides(run_dir) if not any(o.startswith(r.lstrip("~") + "=")
                                                               for r in FAMILIES[family] if r.startswith("~"))]
    cfg = validate(compose([*overrides, *[o for o in FAMILIES[family] if not o.startswith("~")], *BLOW_UP]))
    with pytest.raises(Diverged) as err:
        run(cfg, quiet=True)
    info = err.value.info
    assert info["experience"] == 0 and info["step"] >= 1
    assert info["kind"] in ("loss", "gradient", "parameter") and (info["term"] or info["level"])
    assert "diverged at experience 0, step" in str(err.value)
    assert not (run_dir / STATE_FILE).exists()  # a diverged model is never checkpointed
    assert not (run_dir / "results.json").exists()  # and never reported as finished


def test_the_first_non_finite_term_is_named_with_its_exact_step(tmp_path, monkeypatch):
    """EWC's penalty turns NaN on step 7 of the second experience; the guard looks only every 4
    steps and at the end of each experience, yet names term 'ewc' and the step it happened."""
    original = EWC.extra_loss
    bad_step = {}

    def poisoned(self, learner, batch, logits):
        out = original(self, learner, batch, logits)
        if learner.experience == 1 and "at" not in bad_step:
            bad_step["at"] = learner.total_steps + 7
        if learner.experience == 1 and learner.total_steps + 1 == bad_step["at"]:
            return out * float("nan")
        return out

    monkeypatch.setattr(EWC, "extra_loss", poisoned)
    cfg = _cfg(tmp_path / "ewc", "strategy=ewc", "+task.first_experiences=2", "trainer.log_every=4",
               "trainer.epochs=2")
    with pytest.raises(Diverged) as err:
        run(cfg, quiet=True)
    info = err.value.info
    assert info["kind"] == "loss" and info["term"] == "ewc" and info["experience"] == 1
    assert info["step"] == bad_step["at"]
    assert info["losses"]["ewc"] == "nan" and isinstance(info["losses"]["task"], float)
    assert info["non_finite_terms"] == ["ewc"]


class _PoisonParameter(L.Callback):
    def on_train_end(self, trainer, learner):
        with torch.no_grad():
            next(learner.model.parameters()).view(-1)[0] = float("inf")


def test_a_non_finite_parameter_stops_the_run(tmp_path):
    cfg = _cfg(tmp_path / "p", "+task.first_experiences=1", "trainer.epochs=1")
    with pytest.raises(Diverged) as err:
        run(cfg, callbacks=[_PoisonParameter()], quiet=True)
    assert err.value.info["kind"] == "parameter" and err.value.info["level"] == "outer"


def _strict(text):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


def _cli(*args, timeout=600, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "nlcl.cli", "run", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_single_run_exits_non_zero_and_records_where(tmp_path):
    run_dir = tmp_path / "single"
    out = _cli(*tiny_overrides(run_dir), *BLOW_UP, cwd=tmp_path)
    assert out.returncode == 3, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # run_dir given: no empty runs/adhoc/... folder
    res = _strict((run_dir / "results.json").read_text())
    assert res["status"] == "diverged" and res["divergence"]["experience"] == 0
    assert res["divergence"]["step"] >= 1 and res["model"] == "transformer"
    lines = [line for line in out.stderr.splitlines() if "diverged at experience 0" in line]
    assert len(lines) == 1 and "Traceback" not in out.stderr


def test_sweep_records_a_diverged_run_and_goes_on(tmp_path):
    from nlcl.report import build_report

    sweep_dir = tmp_path / "sweep"
    base = [o for o in tiny_overrides("unused") if not o.startswith(("run_dir=", "optim.lr="))]
    out = _cli("-m", f"hydra.sweep.dir={sweep_dir}", *base, "optim=sgd", "optim.lr=1e4,0.05",
               "trainer.gradient_clip=null", "+task.first_experiences=1", "trainer.epochs=1")
    assert out.returncode == 0, out.stderr[-2000:]
    status = {p.parent.name: _strict(p.read_text())["status"] for p in sweep_dir.glob("*/results.json")}
    assert sorted(status.values()) == ["diverged", "finished"], status
    assert "1 runs finished, 0 failed, 1 diverged" in out.stdout
    rep = build_report([sweep_dir], tmp_path / "report", plots=False)
    assert len(rep.runs) == 1 and [r["status"] for r in rep.left_out] == ["diverged"]
    assert "## Diverged runs" in rep.markdown and "diverged at experience 0" in rep.markdown
