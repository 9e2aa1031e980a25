"""Every model file in nlcl/conf/model/ and every experiment config is built into a model through
the runner's own path (compose -> validate -> build_parts) and trained for one optimizer step by
Lightning, at tiny sizes given by override; what the file says reaches the built layers (a
`units: [token, step, step]` that became `[step, step, step]`, or a misspelt field, fails here);
and each named ablation (hope_no_dgd, hope_no_cms, and the Table 6 switches of
docs/results/hope_ablations) changes the layer it names and the model's outputs.
"""
import sys
from dataclasses import is_dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from nlcl.config import compose, config_dir, validate
from nlcl.models.cms import ContinuumMemory
from nlcl.models.self_modifying_titans import SelfModifyingTitans
from nlcl.runner import build_parts

CONF = config_dir()
MODEL_FILES = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin_example"

TINY_MODEL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "hidden": 16}  # set where the file has the field
TEXT = ["task=clinc150", "task.train_per_class=2", "task.test_per_class=1", "task.max_len=16"]
LM = ["task=lm_domains", "task.domains=[shakespeare]", "task.seq_len=32", "task.train_sequences=4",
      "task.test_sequences=2", "task.max_chars=20000"]
IMAGES = ["task=split_mnist", "task.train_per_class=2", "task.test_per_class=1"]
COMMON = ["+task.first_experiences=1", "trainer.batch_size=4", "trainer.progress_bar=false", "logger=csv"]


def _model_file(name):
    return yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())


def _task_for(model_file: str) -> list[str]:
    spec = _model_file(model_file)
    if spec["name"] == "mlp":
        return IMAGES
    if "token" in (spec.get("cms") or {}).get("units", []):  # in-context levels act on per-token losses
        return LM
    if spec["name"] == "minilm":
        return [*TEXT, "task.tokenizer=minilm"]
    return TEXT


def _tiny(spec: dict, prefix: str = "model") -> list[str]:
    return [f"{prefix}.{k}={v}" for k, v in TINY_MODEL.items() if k in spec]


def _step_once(parts) -> dict[str, torch.Tensor]:
    """One optimizer step of the first experience through a real Lightning Trainer; returns the
    parameters before it."""
    learner, stream = parts.learner, parts.stream
    learner.start_experience(0, stream.classes_seen(0))
    before = {k: p.detach().clone() for k, p in learner.model.named_parameters()}
    data = parts.strategies[0].train_dataset(stream, 0)
    L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              callbacks=parts.strategies).fit(learner, DataLoader(data, batch_size=4, shuffle=False))
    assert learner.total_steps == 1
    return before


def _assert_trained(model, before):
    moved = [k for k, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[k])]
    assert moved, "no parameter changed in one optimizer step"
    for k, p in model.named_parameters():
        assert torch.isfinite(p).all(), k


def _configs(model) -> list:
    return [m.cfg for m in model.modules() if is_dataclass(getattr(m, "cfg", None))]


def _same(built, given) -> bool:
    if isinstance(given, (int, float)) and isinstance(built, list):  # one value for every level
        return all(b == given for b in built)
    return built == given


def _assert_file_reaches_the_model(model, spec: dict):
    """Each field of the model file (at every depth) is the value of that field in a config the
    built layers hold: top-level fields in the backbone's, `cms.*` in every CMS, `memory.*` in
    every memory layer."""
    configs = _configs(model)
    assert configs, "the model holds no config"
    for key, value in spec.items():
        if key == "name":
            continue
        if isinstance(value, dict):
            if not value:
                continue
            holders = [c for c in configs if any(hasattr(c, k) for k in value) and not hasattr(c, key)]
            for sub, v in value.items():
                assert holders and all(_same(getattr(c, sub), v) for c in holders), (key, sub, v, holders)
        else:
            assert any(hasattr(c, key) and _same(getattr(c, key), value) for c in configs), (key, value)


@pytest.fixture(autouse=True)
def _plugin_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))  # model=custom builds the example plugin's backbone


@pytest.mark.parametrize("name", MODEL_FILES)
def test_every_model_file_builds_reaches_its_layers_and_trains_one_step(tmp_path, name):
    spec = _model_file(name)
    extra = []
    if name == "custom":  # the file leaves _target_ to the user: the example plugin's backbone
        extra = ["model._target_=my_nlcl_plugin.CumulativeMean", "+model.d_model=8"]
    if name == "minilm":
        pytest.importorskip("transformers", reason="MiniLM needs transformers (pip install -e .[data])")
    cfg = validate(compose([f"run_dir={tmp_path / 'r'}", *_task_for(name), f"model={name}", *_tiny(spec),
                            *extra, *COMMON]))
    parts = build_parts(cfg)
    model = parts.learner.model
    if name not in ("custom", "minilm", "mlp"):  # they hold no config objects: checked below instead
        tiny = {**spec, **{k: v for k, v in TINY_MODEL.items() if k in spec}}
        _assert_file_reaches_the_model(model, tiny)
    if name == "minilm":
        from nlcl.levels import parameter_levels

        periods = {s.period for n, s in parameter_levels(model).items() if ".intermediate." in n}
        assert periods == set(spec["mlp_periods"])
    if name == "mlp":  # n_layers hidden layers of `hidden` units, then the head
        widths = [m.out_features for m in model.body if isinstance(m, torch.nn.Linear)]
        assert widths == [TINY_MODEL["hidden"]] * TINY_MODEL["n_layers"]
    if name in IN_CONTEXT:  # what the file is for: a first CMS level that learns in context
        from nlcl.models.incontext import InContextLM

        assert isinstance(model, InContextLM)
        assert [cms.cfg.units[0] for cms in model.modules() if isinstance(cms, ContinuumMemory)] == ["token"]
    before = _step_once(parts)
    _assert_trained(model, before)


IN_CONTEXT = ("hope_full", "hope_incontext")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_and_trains_one_step(tmp_path, name):
    exp = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())
    model_file = next((d["override /model"] for d in exp.get("defaults", []) if isinstance(d, dict)
                       and "override /model" in d), "transformer")
    spec = {**_model_file(model_file), **(exp.get("model") or {})}
    if spec["name"] == "minilm":
        pytest.importorskip("transformers", reason="MiniLM needs transformers (pip install -e .[data])")
    # the experiment's own task, at a few samples (every other field as the experiment sets it)
    task = compose([f"run_dir={tmp_path / 'r'}", f"experiment={name}"]).task
    shrink = {"train_per_class": 2, "test_per_class": 1, "n_train": 8, "n_test": 4, "train_sequences": 4,
              "test_sequences": 2, "countries_per_region": 2, "max_chars": 20000}
    overrides = [f"task.{k}={v}" for k, v in shrink.items() if k in task]
    cfg = validate(compose([f"run_dir={tmp_path / 'r'}", f"experiment={name}", *_tiny(spec), *overrides, *COMMON]))
    parts = build_parts(cfg)
    if spec["name"] not in ("minilm",):
        tiny = {**spec, **{k: v for k, v in TINY_MODEL.items() if k in spec}}
        _assert_file_reaches_the_model(parts.learner.model, tiny)
    before = _step_once(parts)
    _assert_trained(parts.learner.model, before)


# --- ablations: the switch reaches the layer it names, and the outputs change ------------------

HOPE_TINY = [*TEXT, *COMMON, "model.d_model=16", "model.n_layers=1", "model.n_heads=2"]


def _built(tmp_path, *overrides):
    torch.manual_seed(0)
    return build_parts(validate(compose([f"run_dir={tmp_path / 'r'}", *HOPE_TINY, *overrides]))).learner.model.eval()


def _outputs_differ(base, other, x) -> bool:
    """Outputs of `other` after it takes every weight of `base` it has: what is left is the switch."""
    missing, _ = other.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        return not torch.allclose(base(x), other(x), atol=1e-6), set(missing)


def _tokens():
    return torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def _memories(model):
    return [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]


def test_hope_no_dgd_builds_plain_gd_memories_and_changes_the_outputs(tmp_path):
    base, ablated = _built(tmp_path / "a", "model=hope"), _built(tmp_path / "b", "model=hope_no_dgd")
    assert [m.cfg.update_rule for m in _memories(base)] == ["dgd"]
    assert [m.cfg.update_rule for m in _memories(ablated)] == ["gd"]
    # everything else of the layer is the same: the two configs differ in update_rule only
    a, b = vars(_memories(base)[0].cfg).copy(), vars(_memories(ablated)[0].cfg).copy()
    assert {k for k in a if a[k] != b[k]} == {"update_rule"}
    differ, missing = _outputs_differ(base, ablated, _tokens())
    assert differ and not missing  # gd has no erase generator: base's extra weights are simply unused


def test_hope_no_cms_builds_one_mlp_instead_of_the_levels_and_changes_the_outputs(tmp_path):
    base, ablated = _built(tmp_path / "a", "model=hope"), _built(tmp_path / "b", "model=hope_no_cms")
    assert sum(isinstance(m, ContinuumMemory) for m in base.modules()) == 1
    assert not any(isinstance(m, ContinuumMemory) for m in ablated.modules())
    assert [b.mlp is not None for b in ablated.backbone.blocks] == [True]
    assert [m.cfg.update_rule for m in _memories(ablated)] == ["dgd"]  # the mixer is Hope's
    differ, _ = _outputs_differ(base, ablated, _tokens())
    assert differ


@pytest.mark.parametrize("switch, field, value", [
    ("+model.memory.update_rule=gd", "update_rule", "gd"),
    ("+model.memory.momentum=true", "momentum", True),
    ("+model.memory.retention=false", "retention", False),
    ("+model.memory.eigenvalues=positive", "eigenvalues", "positive"),
])
def test_table6_switches_of_the_hope_ablations_reach_the_memory_layer(tmp_path, switch, field, value):
    base, switched = _built(tmp_path / "a", "model=hope"), _built(tmp_path / "b", "model=hope", switch)
    a, b = vars(_memories(base)[0].cfg), vars(_memories(switched)[0].cfg)
    assert b[field] == value and a[field] != value
    assert {k for k in a if a[k] != b[k]} == {field}
    differ, _ = _outputs_differ(base, switched, _tokens())
    assert differ


def test_a_misspelt_or_dropped_field_of_a_model_file_is_caught(tmp_path):
    """What the fault report's mutations of the model files did, done here on purpose."""
    with pytest.raises(ValueError, match="inner_lrr"):
        _built(tmp_path / "a", "model=hope_full", "+model.cms.inner_lrr=0.1")
    parts = build_parts(validate(compose([f"run_dir={tmp_path / 'b'}", *LM, *COMMON, "model=hope_incontext",
                                          "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                                          "model.cms.units=[step,step,step]"])))
    with pytest.raises(AssertionError):
        _assert_file_reaches_the_model(parts.learner.model, {**_model_file("hope_incontext"), "d_model": 16,
                                                             "n_layers": 1, "n_heads": 2})
