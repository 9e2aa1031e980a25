"""One plugin door, honoured everywhere: `_target_` paths and `plugins: [module]` reach user code in
the launching process and in joblib workers; the model contract is checked and the pad id passed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlcl.config import ConfigError, compose, validate
from nlcl.plugins import PluginError
from nlcl.runner import build_parts, run

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "tests" / "plugin_example"
STREAM = "my_nlcl_plugin.first_token_stream"


@pytest.fixture(autouse=True)
def _plugin_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))


def _tiny(run_dir, *extra):
    return [f"run_dir={run_dir}", "task=custom", f"task._target_={STREAM}", "trainer.epochs=2", "optim.lr=1e-2",
            "trainer.batch_size=16", "trainer.progress_bar=false", "logger=csv", *extra]


def test_a_plugin_stream_with_a_registered_backbone_gets_the_pad_id(tmp_path):
    cfg = validate(compose(_tiny(tmp_path / "r", "plugins=[my_nlcl_plugin]", "model.name=cumulative_mean",
                                 "~model.d_model", "~model.n_layers", "~model.n_heads")))
    parts = build_parts(cfg)
    assert parts.stream.name == "first_token" and parts.learner.model.backbone.pad_id == 3
    assert parts.learner.model.pad_id == 3  # the head reads the last real token, not a pad


def test_target_model_classifier_strategy_and_optimizer(tmp_path):
    """A whole classifier by _target_, a strategy and a torch optimizer by path, in one real run."""
    cfg = validate(compose(_tiny(
        tmp_path / "r", "model=custom", "model._target_=my_nlcl_plugin.BagOfTokens", "+model.width=8",
        "+strategy._target_=nlcl.strategies.Replay", "strategy.name=my_replay", "+strategy.mem_size=16",
        "+optim._target_=torch.optim.RMSprop", "optim.name=rmsprop")))
    parts = build_parts(cfg)
    assert type(parts.learner.model).__name__ == "BagOfTokens" and parts.learner.model.pad_id == 3
    assert type(parts.strategies[0]).__name__ == "Replay"
    inner = {type(o).__name__ for o in parts.learner.optimizer.inner.values()}
    assert inner == {"RMSprop"}
    results = run(cfg)
    assert results["status"] == "finished" and results["optim"] == "rmsprop"
    # the first token says the class: after two experiences the last one is learned
    assert results["accuracy_matrix"][-1][-1] > 0.5


@pytest.mark.parametrize("override, field", [
    ("task._target_=my_nlcl_plugin.nope", "task._target_"),
    ("+task.n_clases=3", "task.n_clases"),
    ("plugins=[no_such_module]", "plugins[0]"),
    ("+strategy._target_=torch.nn.Linear", "strategy"),
])
def test_bad_plugin_input_names_the_field(tmp_path, override, field):
    with pytest.raises((ConfigError, PluginError, ValueError)) as err:
        cfg = validate(compose(_tiny(tmp_path / "r", override)))
        build_parts(cfg)
    assert field in str(err.value)
    assert not (tmp_path / "r").exists()


def test_a_backbone_without_d_model_is_refused(tmp_path):
    cfg = validate(compose(_tiny(tmp_path / "r", "model=custom", "model._target_=torch.nn.Embedding",
                                 "+model.num_embeddings=30", "+model.embedding_dim=4")))
    with pytest.raises(PluginError, match="d_model"):
        build_parts(cfg)


def test_joblib_sweep_with_a_plugin_stream_and_a_plugin_model(tmp_path):
    """The probe of the issue: registered at import of a plugin module, used by 2 joblib workers."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "nlcl.cli", "run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           f"hydra.sweep.dir={sweep}", "plugins=[my_nlcl_plugin]", "task=custom", f"task._target_={STREAM}",
           "model.name=cumulative_mean", "~model.d_model", "~model.n_layers", "~model.n_heads", "seed=0,1",
           "trainer.epochs=1", "trainer.progress_bar=false", "logger=csv"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(runs) == 2 and all(r["status"] == "finished" for r in runs), [r.get("error") for r in runs]
    assert {r["stream"] for r in runs} == {"first_token"} and {r["model"] for r in runs} == {"cumulative_mean"}
    assert {r["seed"] for r in runs} == {0, 1}
    assert "2 runs finished, 0 failed" in out.stdout

    # nlcl evaluate, another process again, rebuilds the plugin stream and model from the run's config
    run_dir = sorted(p.parent for p in sweep.glob("*/results.json"))[0]
    ev = subprocess.run([sys.executable, "-m", "nlcl.cli", "evaluate", str(run_dir), "task.seed=7", "--name", "fresh"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    record = json.loads((run_dir / "evaluations" / "fresh.json").read_text())
    assert record["experiences"] == ["tokens [0, 1]", "tokens [2, 3]"] and len(record["scores"]) == 2


def test_task_avalanche_builds_the_benchmark_from_config(tmp_path):
    cfg = validate(compose([f"run_dir={tmp_path / 'r'}", "task=avalanche",
                            "task.benchmark._target_=my_nlcl_plugin.tiny_benchmark", "+task.benchmark.n_experiences=2",
                            "model=mlp"]))
    parts = build_parts(cfg)
    assert len(parts.stream) == 2 and parts.stream.input_kind == "image" and parts.stream.num_classes == 4
    assert type(parts.learner.model).__name__ == "MLPClassifier"
