"""Config schemas: every field typed and range-checked before any work starts.

Hydra composes the YAML groups in conf/ and tasks/; `validate` merges each section into its
structured schema (OmegaConf rejects a wrong type or an unknown field, naming it) and checks the
ranges and names that types cannot express.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the allowed values."""


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    precision: str = "32-true"
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 512
    gradient_clip: float | None = 1.0
    log_every: int = 25
    progress_bar: bool = True
    limit_train_batches: float | None = None


@dataclass
class LoggerConfig:
    csv: bool = True
    wandb: bool = True
    wandb_mode: str = "offline"
    project: str = "nlcl"


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    return repo_root() / "conf"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: DictConfig) -> DictConfig:
    """Raise ConfigError naming the field for anything that cannot work; return cfg unchanged."""
    from nlcl.models import model_names
    from nlcl.optim import OPTIMIZERS
    from nlcl.streams import STREAMS
    from nlcl.strategies import strategy_names

    for section, schema in (("trainer", TrainerConfig), ("logger", LoggerConfig)):
        try:
            OmegaConf.merge(OmegaConf.structured(schema), cfg[section])
        except OmegaConfBaseException as e:
            raise ConfigError(f"{section}: {e.msg if hasattr(e, 'msg') else e}".split("\n")[0]) from None
    t = cfg.trainer
    _check(t.accelerator in ACCELERATORS, f"trainer.accelerator: '{t.accelerator}' is not one of {ACCELERATORS}")
    _check(str(t.precision) in PRECISIONS, f"trainer.precision: '{t.precision}' is not one of {PRECISIONS}")
    for field in ("epochs", "batch_size", "eval_batch_size", "log_every"):
        _check(int(t[field]) >= 1, f"trainer.{field}: must be >= 1, got {t[field]}")
    _check(t.gradient_clip is None or float(t.gradient_clip) >= 0, "trainer.gradient_clip: must be >= 0 or null")
    _check(isinstance(cfg.get("seed"), int) and cfg.seed >= 0, f"seed: must be a non-negative integer, got {cfg.get('seed')!r}")
    _check("stream" in cfg.task, "task.stream: missing; every task file names its stream")
    _check(cfg.task.stream in sorted(STREAMS), f"task.stream: unknown stream '{cfg.task.stream}'; allowed: {sorted(STREAMS)}")
    _check(cfg.model.name in model_names(), f"model.name: unknown model '{cfg.model.name}'; allowed: {model_names()}")
    _check(cfg.strategy.name in strategy_names(), f"strategy.name: unknown strategy '{cfg.strategy.name}'; allowed: {strategy_names()}")
    _check(cfg.optim.name in sorted(OPTIMIZERS), f"optim.name: unknown optimizer '{cfg.optim.name}'; allowed: {sorted(OPTIMIZERS)}")
    _check(float(cfg.optim.lr) > 0, f"optim.lr: must be > 0, got {cfg.optim.lr}")
    return cfg


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the config outside a Hydra app (tests, notebooks); `run_dir` must be overridden."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides or [])
    return cfg
