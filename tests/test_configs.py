"""Every option of every config group composes and validates; wrong input fails before any work,
naming the field and what it accepts."""

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import get_class

from nlcl.config import ConfigError, compose, config_dir, validate
from nlcl.models import model_names
from nlcl.optim import OPTIMIZERS
from nlcl.streams import STREAMS
from nlcl.strategies import strategy_names

CONF = config_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_the_config_groups_are_where_the_docs_say():
    assert {"model", "strategy", "optim", "trainer", "logger", "experiment", "task"} <= set(GROUPS)
    assert CONF.parent.name == "nlcl" and (CONF / "task" / "clinc150.yaml").is_file()  # package data
    for g in GROUPS:
        assert any(opt for grp, opt in OPTIONS if grp == g), f"group {g} has no options"


# the fields a user's-own-data task requires (validation reads no data, so the files need not exist)
REQUIRED = {"task=files": ["task.path=my.csv", "task.n_experiences=2"],
            "task=image_folder": ["task.path=my_images", "task.n_experiences=2"],
            "task=huggingface": ["task.path=my_hf_dataset", "task.n_experiences=2"],
            "task=avalanche": ["task.benchmark._target_=my_module.make_benchmark"],
            "task=custom": ["task._target_=nlcl.streams.clinc150_stream"],
            "model=custom": ["model._target_=nlcl.models.transformer.TransformerBackbone"]}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(tmp_path, group, option):
    choice = f"{group}={option}"
    if (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():  # refused before any work
        with pytest.raises(ConfigError, match="trainer.accelerator: 'gpu' but this machine has no CUDA GPU"):
            validate(compose([f"run_dir={tmp_path / 'run'}", choice]))
        return
    cfg = validate(compose([f"run_dir={tmp_path / 'run'}", choice, *REQUIRED.get(choice, [])]))
    # every file names a registered stream / model / strategy / optimizer, or a _target_ (custom)
    assert cfg.task.stream in STREAMS or "_target_" in cfg.task
    assert cfg.model.name in model_names() or "_target_" in cfg.model
    assert cfg.strategy.name in strategy_names() and cfg.optim.name in OPTIMIZERS
    assert not (tmp_path / "run").exists()  # validation writes nothing


def _fails(*overrides) -> str:
    with pytest.raises(ConfigError) as err:
        validate(compose(["run_dir=/nonexistent/never-written", *overrides]))
    return str(err.value)


@pytest.mark.parametrize("override, field, allowed", [
    ("model.name=nosuch", "model.name", ["transformer", "hope"]),
    ("strategy.name=nosuch", "strategy.name", ["naive", "replay"]),
    ("task.stream=nosuch", "task.stream", ["clinc150", "banking77"]),
    ("optim.name=nosuch", "optim.name", ["adamw", "sgd"]),
    ("model=nosuch", "model=nosuch", ["transformer", "hope"]),
    ("strategy=nosuch", "strategy=nosuch", ["naive", "replay"]),
    ("task=nosuch", "task=nosuch", ["clinc150"]),
    ("trainer.precision=fp8", "trainer.precision", ["32-true", "bf16-mixed"]),
    ("trainer.accelerator=tpu", "trainer.accelerator", ["cpu", "gpu"]),
    ("logger.wandb_mode=sometimes", "logger.wandb_mode", ["offline", "disabled"]),
])
def test_unknown_names_list_the_allowed_ones(override, field, allowed):
    msg = _fails(override)
    assert msg.startswith(field), msg
    assert "nosuch" in msg or override.split("=")[1] in msg
    for name in allowed:
        assert f"'{name}'" in msg, msg


@pytest.mark.parametrize("override, field, expected", [
    ("trainer.epochs=abc", "trainer.epochs", "int"),
    ("trainer.batch_size=1.5", "trainer.batch_size", "int"),
    ("trainer.progress_bar=maybe", "trainer.progress_bar", "bool"),
    ("trainer.gradient_clip=big", "trainer.gradient_clip", "float"),
    ("optim.lr=abc", "optim.lr", "number"),
    ("seed=abc", "seed", "integer"),
    ("strategy.mem_size=abc", "strategy.mem_size", "integer"),
    ("task.max_len=long", "task.max_len", "integer"),
])
def test_wrong_types_name_the_field_and_the_type(override, field, expected):
    extra = ["strategy=replay"] if "mem_size" in override else []
    msg = _fails(*extra, override)
    assert msg.startswith(field + ":"), msg
    assert expected in msg, msg


@pytest.mark.parametrize("override, field", [
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.batch_size=-4", "trainer.batch_size"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.gradient_clip=-1", "trainer.gradient_clip"),
    ("trainer.gradient_clip_algorithm=l1", "trainer.gradient_clip_algorithm"),
    ("optim.level_accumulation=sums", "optim.level_accumulation"),
    ("trainer.limit_train_batches=0.0", "trainer.limit_train_batches"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("seed=-1", "seed"),
    ("seed=5000000", "seed"),  # seed * 1000 + i would leave numpy's range, which Lightning refuses
    ("+task.first_experiences=0", "task.first_experiences"),
])
def test_out_of_range_values_name_the_field(override, field):
    msg = _fails(override)
    assert msg.startswith(field + ":"), msg
    assert override.split("=")[1] in msg, msg  # and says what it got


def test_in_range_edge_values_pass(tmp_path):
    validate(compose([f"run_dir={tmp_path}", "trainer.limit_train_batches=1.0", "trainer.gradient_clip=0",
                      "optim.weight_decay=0", "seed=0", "+task.first_experiences=1"]))
    validate(compose([f"run_dir={tmp_path}", "trainer.limit_train_batches=3", "trainer.gradient_clip=null"]))


@pytest.mark.parametrize("override, field, allowed", [
    ("+trainer.foo=1", "trainer.foo", ["epochs", "batch_size", "precision"]),
    ("trainer.foo=1", "trainer.foo", ["epochs", "batch_size", "precision"]),  # without + Hydra refuses
    ("+logger.foo=1", "logger.foo", ["csv", "wandb"]),
    ("+task.foo=1", "task.foo", ["max_len", "tokenizer", "train_per_class"]),
    ("+strategy.foo=1", "strategy.foo", []),
    ("+optim.foo=1", "optim.foo", []),
])
def test_unknown_fields_name_the_field_and_the_known_ones(override, field, allowed):
    msg = _fails(override)
    assert msg.startswith(field + ":"), msg
    for name in allowed:
        assert name in msg, msg


def test_unknown_strategy_option_lists_that_strategys_options():
    msg = _fails("strategy=replay", "+strategy.memsize=10")
    assert msg.startswith("strategy.memsize:") and "mem_size" in msg and "replay_batch_size" in msg, msg


def _hydra_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=["run_dir=x", *overrides], return_hydra_config=True)


def test_default_launcher_is_basic_and_sweeps_get_one_folder_per_run():
    cfg = _hydra_cfg()
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    # job.num in the subfolder: two runs of a sweep never share a folder
    from omegaconf import OmegaConf

    assert "job.num" in OmegaConf.to_container(cfg.hydra.sweep)["subdir"]


def test_joblib_launcher_composes_and_builds(tmp_path):
    cfg = _hydra_cfg("hydra/launcher=joblib", "hydra.launcher.n_jobs=3")
    launcher_cls = get_class(cfg.hydra.launcher._target_)  # the plugin is installed with nlcl
    params = {k: v for k, v in cfg.hydra.launcher.items() if k != "_target_"}
    launcher = launcher_cls(**params)
    assert launcher.joblib["n_jobs"] == 3
    # every field of the plugin's own schema is present in ours (ours replaces it)
    from omegaconf import OmegaConf
    from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf

    assert set(OmegaConf.structured(JobLibLauncherConf).keys()) == set(cfg.hydra.launcher.keys())


def test_slurm_launcher_config_composes_without_the_plugin():
    cfg = _hydra_cfg("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=/tmp/sweep")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu"
    assert launcher.submitit_folder == "/tmp/sweep/.submitit/%j"
    assert launcher.tasks_per_node == 1  # one process per run
    # the keys hydra-submitit-launcher 1.2's SlurmQueueConf has (its launcher passes each to submitit)
    assert set(launcher.keys()) == {
        "_target_", "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
        "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint", "exclude", "gres",
        "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
        "max_num_timeout", "additional_parameters", "array_parallelism", "setup"}
    # and choosing it does not disturb the job's config
    assert validate(compose(["run_dir=x"])) is not None


def test_first_help_screen_names_commands_and_examples(capsys):
    from nlcl.cli import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("run", "report", "bench", "-m", "nlcl run --help", "joblib", "submitit_slurm"):
        assert word in text, word


def test_help_screen_lists_groups_options_and_examples(capsys):
    from nlcl.cli import main

    with pytest.raises(SystemExit) as done:  # Hydra exits after printing its help
        main(["run", "--help"])
    assert done.value.code in (0, None)
    text = capsys.readouterr().out
    for group in ("model", "strategy", "task", "optim", "trainer", "logger", "experiment", "hydra/launcher"):
        assert f"{group}:" in text, group
    for option in ("hope", "transformer", "replay", "clinc150", "joblib", "submitit_slurm"):
        assert option in text, option
    assert text.count("nlcl run ") >= 2 and "nlcl report" in text
    assert text.index("== Examples ==") < text.index("== Default config")  # examples on the first screen
