"""Config schemas: every field typed and range-checked before any work starts.

Hydra composes the YAML groups in nlcl/conf/ (task definitions in nlcl/conf/task/); `validate` merges each section into its
structured schema (OmegaConf rejects a wrong type or an unknown field) and checks the ranges and
names that types cannot express. Every ConfigError names the field and what it accepts.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from nlcl.config_checks import suggest

PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
WANDB_MODES = ("offline", "online", "disabled", "dryrun", "shared")
# the runner seeds experience i with seed * 1000 + i and Lightning refuses seeds above 2**32 - 1:
# a larger seed would fail at the first experience, after the data and the first evaluation
MAX_SEED = (2**32 - 1) // 1000 - 1


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the allowed values."""


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    precision: str = "32-true"
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 512
    gradient_clip: float | None = 1.0  # clips each step's fresh gradient (slow levels' sums live in the optimizer)
    gradient_clip_algorithm: str = "norm"  # norm (global l2 norm) | value (elementwise)
    log_every: int = 25
    progress_bar: bool = True
    limit_train_batches: float | None = None  # a fraction in (0, 1], or (an int) a number of batches
    eval_every_n_steps: int | None = None  # step-granular evaluation (forgetting curves, stability gap)
    eval_subsample: int = 100  # test samples per experience for those evaluations
    mask_unseen: bool = True  # training loss over the classes seen so far; false: over all (avalanche's default)
    devices: int = 1  # processes per node (one per GPU); > 1 trains with trainer.strategy
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp (Lightning's strategies)


@dataclass
class LoggerConfig:
    csv: bool = True
    wandb: bool = True
    wandb_mode: str = "offline"
    project: str = "nlcl"


def repo_root() -> Path:
    """The folder above the package: the checkout in a development install (notebooks look for
    multirun/ there); in an installed wheel it is site-packages and nothing relies on it."""
    return Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    """nlcl's Hydra config groups ship inside the package (package data), so an installed wheel
    composes the same configs as a checkout."""
    return Path(__file__).resolve().parent / "conf"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_schema(section: str, schema: type, node) -> None:
    """OmegaConf's type check, re-worded to name `section.field` and what it accepts."""
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        key = getattr(e, "key", None) or "?"
        if isinstance(e, ConfigKeyError):
            names = [f.name for f in fields(schema)]
            raise ConfigError(f"{section}.{key}: unknown field{suggest(key, names)} (allowed: {names})") from None
        types = {f.name: f.type for f in fields(schema)}
        got = node.get(key) if key in node else None
        raise ConfigError(f"{section}.{key}: expected {types.get(key, '?')}, got {got!r}") from None


def _check_options(section: str, fn, options: dict, owner: str) -> None:
    """Keyword options of a builder: every name must be a parameter of `fn`, and a value must have
    the type of that parameter's default (when the default is a plain number, bool or string)."""
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    allowed = sorted(k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and k != "self")
    for key, value in options.items():
        if key not in params:
            _check(accepts_any, f"{section}.{key}: not an option of {owner}{suggest(key, allowed)} "
                                f"(allowed: {allowed or 'none, it takes no options'})")
            continue
        default = params[key].default
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "a boolean"
        elif isinstance(default, int):
            ok, want = _is_int(value), "an integer"
        elif isinstance(default, float):
            ok, want = _is_number(value), "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            continue  # None or a structure: the builder checks it
        _check(ok or value is None, f"{section}.{key}: expected {want} (default {default!r}), got {value!r}")


# continual-learning strategies tested under trainer.strategy=fsdp (tests/test_fsdp_run.py)
FSDP_STRATEGIES = ("naive",)


def _check_trainer(t: DictConfig) -> None:
    _check(t.accelerator in ACCELERATORS, f"trainer.accelerator: '{t.accelerator}' is not one of {ACCELERATORS}")
    _check(str(t.precision) in PRECISIONS, f"trainer.precision: '{t.precision}' is not one of {PRECISIONS}")
    for field in ("epochs", "batch_size", "eval_batch_size", "log_every"):
        _check(int(t[field]) >= 1, f"trainer.{field}: must be an integer >= 1, got {t[field]}")
    _check(t.gradient_clip is None or float(t.gradient_clip) >= 0,
           f"trainer.gradient_clip: must be >= 0 or null, got {t.gradient_clip}")
    _check(t.gradient_clip_algorithm in ("norm", "value"),
           f"trainer.gradient_clip_algorithm: must be 'norm' or 'value', got {t.gradient_clip_algorithm!r}")
    for field in ("devices", "num_nodes"):
        _check(_is_int(t.get(field, 1)) and t.get(field, 1) >= 1,
               f"trainer.{field}: must be an integer >= 1, got {t.get(field)!r}")
    strategies = ("auto", "ddp", "ddp_spawn", "fsdp")
    _check(t.get("strategy", "auto") in strategies,
           f"trainer.strategy: '{t.get('strategy')}' is not one of {strategies}")
    _check(t.get("strategy", "auto") != "fsdp" or t.get("devices", 1) * t.get("num_nodes", 1) >= 2,
           "trainer.strategy=fsdp: shards the parameters over several processes; set trainer.devices (x "
           "trainer.num_nodes) to 2 or more, or train one process with trainer.strategy=auto")
    _check(t.get("devices", 1) * t.get("num_nodes", 1) == 1 or t.batch_size >= t.get("devices", 1) * t.get("num_nodes", 1),
           f"trainer.batch_size: the global batch ({t.batch_size}) must have at least one sample per process "
           f"(trainer.devices x trainer.num_nodes = {t.get('devices', 1) * t.get('num_nodes', 1)})")
    limit = t.get("limit_train_batches")
    _check(limit is None or (_is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit <= 1),
           f"trainer.limit_train_batches: must be null, a fraction in (0, 1] or a number of batches >= 1, got {limit}")


def _check_target(section: str, node: DictConfig, labels: tuple[str, ...]):
    """A `_target_` section: importable, and its other fields are options of the target."""
    from nlcl.plugins import resolve

    _check(isinstance(node.get(labels[0]), str),
           f"{section}.{labels[0]}: a `_target_` {section} still needs a {labels[0]} (it labels folders and reports)")
    fn = resolve(node._target_, f"{section}._target_")
    options = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in ("_target_", *labels)}
    return fn, options


def _check_task_counts(task: DictConfig) -> None:
    first = task.get("first_experiences")
    _check(first is None or (_is_int(first) and first >= 1),
           f"task.first_experiences: must be null or an integer >= 1, got {first!r}")
    validation = task.get("validation_per_class")
    _check(validation is None or (_is_int(validation) and validation >= 1),
           f"task.validation_per_class: must be null or an integer >= 1, got {validation!r}")
    token_dir = task.get("token_dir")
    _check(token_dir is None or (isinstance(token_dir, str) and token_dir.strip() != ""),
           f"task.token_dir: must be null or a folder path, got {token_dir!r}")


def _check_task(task: DictConfig) -> None:
    from nlcl.streams import STREAMS

    _check("stream" in task, "task.stream: missing; every task file names its stream")
    custom = "_target_" in task
    _check(custom or task.stream in STREAMS,
           f"task.stream: unknown stream '{task.stream}'; allowed: {sorted(STREAMS)} (or give task._target_)")
    options = OmegaConf.to_container(task, resolve=True)
    for key in ("stream", "_target_", "first_experiences", "validation_per_class", "token_dir"):
        options.pop(key, None)
    if custom:
        from nlcl.plugins import resolve

        _check_options("task", resolve(task._target_, "task._target_"), options, task._target_)
    else:
        _check_options("task", STREAMS[task.stream], options, f"stream '{task.stream}'")


def _check_strategy(strategy: DictConfig) -> None:
    from nlcl.strategies import STRATEGIES, strategy_names

    name = strategy.get("name")
    if "_target_" in strategy:
        fn, options = _check_target("strategy", strategy, ("name",))
        _check_options("strategy", fn, options, strategy._target_)
        return
    _check(name in STRATEGIES, f"strategy.name: unknown strategy '{name}'; allowed: {strategy_names()}")
    options = {k: v for k, v in OmegaConf.to_container(strategy, resolve=True).items() if k != "name"}
    _check_options("strategy", STRATEGIES[name], options, f"strategy '{name}'")


def _check_optim(optim: DictConfig) -> None:
    import torch

    from nlcl.optim import OPTIMIZERS, build_optimizer

    name = optim.get("name")
    if "_target_" in optim:
        _check_target("optim", optim, ("name",))
    else:
        _check(name in OPTIMIZERS,
               f"optim.name: unknown optimizer '{name}'; allowed: {sorted(OPTIMIZERS)} (or give optim._target_)")
    from nlcl.optim.multifrequency import ACCUMULATIONS

    acc = optim.get("level_accumulation", "gradient")
    _check(acc in ACCUMULATIONS, f"optim.level_accumulation: '{acc}' is not one of {ACCUMULATIONS}")
    # the remaining fields go to the optimizer class: build it on a 2x2 layer to let it refuse them
    options = {k: v for k, v in OmegaConf.to_container(optim, resolve=True).items() if k != "name"}
    try:
        build_optimizer(torch.nn.Linear(2, 2), name, **options)
    except (TypeError, ValueError) as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        field = f"optim.{unknown.group(1)}: not an option of optimizer '{name}'" if unknown else f"optim ({name})"
        raise ConfigError(f"{field}: {e}") from None


def validate_static(cfg: DictConfig) -> DictConfig:
    """The checks that import neither torch nor Lightning (nor any plugin): the config's own types,
    ranges and names, run_dir, the accelerator where the machine has no GPU device at all. The CLI
    runs them first, so most bad values are refused in about a second; raises ConfigError."""
    from nlcl.config_checks import check_static

    plugins = cfg.get("plugins") or []
    _check(OmegaConf.is_list(plugins) or isinstance(plugins, list),
           f"plugins: a list of module names, e.g. plugins=[my_module], got {plugins!r}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    _check(not missing, f"{', '.join(missing)}: required, no default (set it, e.g. {missing[0] if missing else ''}=...)")
    check_static(cfg)  # strict types, ranges, top-level keys, run_dir
    _check_schema("trainer", TrainerConfig, cfg.trainer)
    _check_schema("logger", LoggerConfig, cfg.logger)
    _check_trainer(cfg.trainer)
    _check(cfg.logger.wandb_mode in WANDB_MODES, f"logger.wandb_mode: '{cfg.logger.wandb_mode}' is not one of {WANDB_MODES}")
    seed = cfg.get("seed")
    _check(_is_int(seed) and 0 <= seed <= MAX_SEED, f"seed: must be an integer in [0, {MAX_SEED}], got {seed!r}")
    _check("stream" in cfg.task, "task.stream: missing; every task file names its stream")
    _check_task_counts(cfg.task)
    _check(_is_number(cfg.optim.get("lr")) and cfg.optim.lr > 0, f"optim.lr: must be a number > 0, got {cfg.optim.get('lr')!r}")
    wd = cfg.optim.get("weight_decay", 0.0)
    _check(_is_number(wd) and wd >= 0, f"optim.weight_decay: must be a number >= 0, got {wd!r}")
    return cfg


def validate(cfg: DictConfig) -> DictConfig:
    """Raise ConfigError naming the field for anything that cannot work; return cfg unchanged.

    `validate_static` first, then the checks against the builders (stream, model names, strategy,
    optimizer), after the config's plugins are imported. Cheap: it builds nothing but a 2x2
    optimizer, reads no data. Model fields are checked when the model is built (the first thing a
    run does, before it writes anything)."""
    from nlcl.config_checks import check_declared_options, check_environment
    from nlcl.models import model_names
    from nlcl.plugins import load_plugins

    validate_static(cfg)
    load_plugins(list(cfg.get("plugins") or []))  # plugin modules may register streams and models checked below
    check_declared_options(cfg)
    _check_task(cfg.task)
    if "_target_" in cfg.model:
        _check_target("model", cfg.model, ("name",))
    else:
        _check(cfg.model.get("name") in model_names(),
               f"model.name: unknown model '{cfg.model.get('name')}'; allowed: {model_names()} (or give model._target_)")
    _check_strategy(cfg.strategy)
    _check(cfg.trainer.get("strategy", "auto") != "fsdp" or cfg.strategy.get("name") in FSDP_STRATEGIES,
           f"trainer.strategy=fsdp: strategy={cfg.strategy.get('name')} is not run under parameter sharding yet "
           f"(its passes outside training, e.g. importance estimates, copies or projections of the model, are "
           f"not tested on sharded parameters); under fsdp use strategy={' or '.join(FSDP_STRATEGIES)}, or "
           "trainer.strategy=ddp for every strategy")
    _check_optim(cfg.optim)
    check_environment(cfg)
    return cfg


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the config outside a Hydra app (tests, notebooks); `run_dir` must be overridden.

    A group option or override that does not exist raises ConfigError with Hydra's explanation
    (which lists the group's options)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides or [])
    except HydraException as e:
        missing, options = getattr(e, "missing_cfg_file", None), getattr(e, "options", None)
        if missing and options:  # e.g. model=foo
            group, _, option = missing.rpartition("/")
            raise ConfigError(f"{group}={option}: no such option in group '{group}'{suggest(option, options)} "
                              f"(allowed: {sorted(options)})") from None
        text = str(e).split("\nConfig search path")[0].strip()
        unknown = re.match(r"Could not override '([\w.]+)'", text)
        if unknown:  # e.g. trainer.foo=1: list the fields the node has
            path = unknown.group(1)
            parent, _, key = path.rpartition(".")
            rest = [o for o in overrides if not o.lstrip("~+").startswith(f"{path}=")]
            node = OmegaConf.select(compose(rest), parent) if parent else None
            allowed = f"{suggest(key, node)} (allowed: {sorted(node)})" if isinstance(node, DictConfig) else ""
            raise ConfigError(f"{path}: no such field{allowed}; add a new one with +{path}=...") from None
        raise ConfigError("; ".join(line.strip() for line in text.splitlines() if line.strip())) from None
