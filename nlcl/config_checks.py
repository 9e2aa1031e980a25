"""Checks that close the gaps types alone leave open: no silent wrong configs.

`check_static(cfg)` (no torch, no Lightning: the CLI runs it first) and `check_declared_options(cfg)`
(against the builders) refuse, naming the field and what it accepts:
- unknown top-level keys (`+sed=3`), with "did you mean" from the allowed names;
- a value whose type is not the declared one: no float or bool where an int is meant, no string
  where a list is meant (the declared type is the builder's annotation, else the type the field has
  in its group's YAML file), checked on the values as given, before OmegaConf converts anything;
- numbers that are not finite anywhere, negative numbers anywhere (no field of nlcl means
  anything below 0), zero for sizes, counts, periods, rates and temperatures, fractions above 1;
- attention heads that do not divide the width;
- an empty or unusable run_dir, and an accelerator this machine does not have.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import re
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

TOP_LEVEL = ("task", "model", "strategy", "optim", "trainer", "logger", "seed", "experiment_name", "variant",
             "run_dir", "plugins", "hydra")
# > 0: sizes, counts, periods, step sizes, temperatures (a 0 there divides by zero or does nothing)
POSITIVE = re.compile(r"(^|_)(d_model|heads|layers|hidden|size|len|lens|epochs|every|periods?|per_class|"
                      r"temperature|lr|frequency|subsample|sequences|pairs|candidates|experiences|chars|context)$|^n_")
ZERO_ALLOWED = {"inner_lr", "n_train", "n_test"}  # an in-context rate of 0 switches a level off
AT_MOST_ONE = re.compile(r"(fraction|decay_factor|momentum)$")


class _Err(Exception):
    pass


def suggest(name: str, allowed) -> str:
    close = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _fail(msg: str):
    from nlcl.config import ConfigError

    raise ConfigError(msg)


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- declared types ---------------------------------------------------------------------------

def _matches(value, kind: str) -> bool:
    kind = kind.replace("typing.", "").strip()
    alternatives = [k.strip() for k in kind.split("|")]
    if len(alternatives) > 1:
        return any(_matches(value, k) for k in alternatives)
    if kind in ("None", "NoneType"):
        return value is None
    if kind == "int":
        return _is_int(value)
    if kind == "float":
        return _is_num(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("dict"):
        return isinstance(value, dict)
    if kind in ("list", "tuple", "Sequence"):
        return isinstance(value, list)
    m = re.fullmatch(r"(Sequence|list|tuple)\[(\w+)(, \.\.\.)?\]", kind)
    if m:
        return isinstance(value, list) and all(_matches(v, m.group(2)) for v in value)
    return True  # a type we do not model (a class): the builder checks it


def _want(kind: str) -> str:
    alternatives = [k.strip() for k in kind.split("|")]
    if len(alternatives) > 1:
        return " or ".join("null" if k == "None" else _want(k) for k in alternatives)
    return {"int": "an integer", "float": "a number (float)", "bool": "a bool (true or false)", "str": "a string"}.get(
        kind, kind.replace("Sequence", "a list of").replace("[", " ").replace("]", ""))


def check_annotated(section: str, kinds: dict, options: dict) -> None:
    """Each option against `kinds`: {parameter name: annotation text, or None where there is none}."""
    for key, value in options.items():
        if key not in kinds:
            continue
        kind = kinds[key]
        if kind is None:
            if key.endswith("per_class") and value is not None and not _is_int(value):
                _fail(f"{section}.{key}: expected an integer, got {value!r}")
            continue
        if not _matches(value, kind):
            _fail(f"{section}.{key}: expected {_want(kind)}, got {value!r}")


def check_declared(section: str, fn, options: dict) -> None:
    """Each option against the annotation of `fn`'s parameter of that name."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    check_annotated(section, {k: annotation_text(p) for k, p in params.items()}, options)


def annotation_text(p: inspect.Parameter) -> str | None:
    if p.annotation is inspect.Parameter.empty:
        return None
    return p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))


def _yaml_type_problem(given, default) -> str | None:
    if default is None or given is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(given, bool) else "true or false"
    if _is_int(default):
        return None if _is_int(given) else "an integer"
    if isinstance(default, float):
        return None if _is_num(given) else "a number"
    if isinstance(default, str):
        return None if isinstance(given, str) else "a string"
    if isinstance(default, list):
        if not isinstance(given, list):
            return "a list"
        if default and given:
            inner = [_yaml_type_problem(g, default[0]) for g in given]
            return next((f"a list of {p}s" for p in inner if p), None)
    if isinstance(default, dict) and not isinstance(given, dict):
        return "a mapping"
    return None


def check_like_file(section: str, given: dict, default: dict, prefix: str = "") -> None:
    """A value must keep the type its field has in the group's YAML file."""
    for key, value in given.items():
        if key not in default:
            continue
        if isinstance(value, dict) and isinstance(default[key], dict):
            check_like_file(section, value, default[key], f"{prefix}{key}.")
            continue
        want = _yaml_type_problem(value, default[key])
        if want:
            _fail(f"{section}.{prefix}{key}: expected {want} (as in its config file: {default[key]!r}), got {value!r}")


# ---- ranges -----------------------------------------------------------------------------------

def check_ranges(section: str, node, prefix: str = "") -> None:
    """Every number finite and >= 0; sizes, counts, periods, rates > 0; fractions <= 1."""
    items = node.items() if isinstance(node, dict) else []
    for key, value in items:
        name = f"{section}.{prefix}{key}"
        if isinstance(value, dict):
            check_ranges(section, value, f"{prefix}{key}.")
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not _is_num(v):
                continue
            if not math.isfinite(v):
                _fail(f"{name}: must be a finite number, got {value!r}")
            if v < 0:
                _fail(f"{name}: must be >= 0, got {value!r}")
            if v == 0 and POSITIVE.search(str(key)) and str(key) not in ZERO_ALLOWED:
                _fail(f"{name}: must be > 0, got {value!r}")
            if v > 1 and AT_MOST_ONE.search(str(key)):
                _fail(f"{name}: must be in [0, 1], got {value!r}")


# ---- the whole config -------------------------------------------------------------------------

def _check_top_level(cfg: DictConfig) -> None:
    for key in cfg:
        if key not in TOP_LEVEL:
            _fail(f"{key}: unknown top-level setting{suggest(key, TOP_LEVEL)} (allowed: {list(TOP_LEVEL[:-1])})")


def _check_run_dir(cfg: DictConfig) -> None:
    raw = cfg._get_node("run_dir")._value() if "run_dir" in cfg else None
    if isinstance(raw, str) and "${" in raw:
        return  # Hydra's own output folder, resolved when the run starts
    run_dir = cfg.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir.strip():
        _fail(f"run_dir: must name a folder, got {run_dir!r}")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        _fail(f"run_dir: '{run_dir}' exists and is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        _fail(f"run_dir: '{run_dir}' cannot be created ('{parent}' is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"run_dir: '{run_dir}' cannot be written ('{parent}' is read-only for this user); nothing was run")


def _check_accelerator(cfg: DictConfig) -> None:
    if cfg.trainer.get("accelerator") in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail(f"trainer.accelerator: '{cfg.trainer.accelerator}' but this machine has no CUDA GPU "
                  "(use trainer.accelerator=cpu or auto)")


def _check_trainer_types(cfg: DictConfig) -> None:
    from dataclasses import fields

    from nlcl.config import LoggerConfig, TrainerConfig

    for section, schema in (("trainer", TrainerConfig), ("logger", LoggerConfig)):
        given = _plain(cfg[section])
        for f in fields(schema):
            if f.name == "precision" and f.name in given:
                continue  # 32 and "32" both name a precision; its own check lists the allowed ones
            if f.name not in given:
                _fail(f"{section}.{f.name}: missing (it cannot be removed; its default is {f.default!r})")
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if not _matches(given[f.name], kind):
                _fail(f"{section}.{f.name}: expected {_want(kind)}, got {given[f.name]!r}")
        check_ranges(section, {k: v for k, v in given.items() if k != "limit_train_batches"})


def _merge_defaults(into: dict, more: dict) -> dict:
    for k, v in more.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge_defaults(into[k], v)
        else:
            into.setdefault(k, v)
    return into


@lru_cache(maxsize=None)
def _file_defaults_cached(group: str, name: str, key: str) -> dict:
    import yaml

    from nlcl.config import config_dir

    merged: dict = {}
    for path in sorted((config_dir() / group).glob("*.yaml")):  # every file of the group with this name
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(d, dict) and d.get(key) == name:
            _merge_defaults(merged, {k: v for k, v in d.items() if k != "defaults"})
    return merged


def file_defaults(group: str, name, key: str = "name") -> dict:
    """The fields (with their values) of every file of `group` whose `key` is `name`, merged."""
    return copy.deepcopy(_file_defaults_cached(group, str(name), key))


def _check_model(model: dict) -> None:
    check_like_file("model", model, file_defaults("model", model.get("name")))
    check_ranges("model", {k: v for k, v in model.items() if k != "name"})
    width, heads = model.get("d_model"), model.get("n_heads")
    if _is_int(width) and _is_int(heads) and heads > 0 and width % heads:
        _fail(f"model.n_heads: {heads} heads must divide model.d_model={width}")


def check_environment(cfg: DictConfig) -> None:
    """What this machine must offer the run: a usable run_dir, the chosen accelerator."""
    _check_run_dir(cfg)
    _check_accelerator(cfg)


def _no_gpu_device_files() -> bool:
    """True when this machine certainly has no GPU torch could use: none of the device files the
    NVIDIA, ROCm or WSL drivers create exists. Lets a refused accelerator cost no torch import."""
    dev = Path("/dev")
    return dev.is_dir() and not any(dev.glob("nvidia*")) and not (dev / "kfd").exists() and not (dev / "dxg").exists()


def check_static(cfg: DictConfig) -> None:
    """Every check that needs no builder (stream, model, strategy, optimizer): the config's own
    types against the group's YAML, ranges, top-level keys, run_dir, and an accelerator this machine
    has no device for. It imports neither torch nor Lightning, so most bad values are refused at once;
    `nlcl.config.validate` adds the checks against the builders' signatures."""
    _check_top_level(cfg)
    _check_trainer_types(cfg)
    task = _plain(cfg.task)
    options = {k: v for k, v in task.items() if k not in ("stream", "first_experiences", "validation_per_class", "token_dir")}
    if "_target_" not in task:  # a built-in stream's annotations, read from its source (no import)
        from nlcl.stream_signatures import stream_parameters

        kinds = stream_parameters(task.get("stream"))
        if kinds is not None:
            check_annotated("task", kinds, options)
    check_like_file("task", options, file_defaults("task", task.get("stream"), key="stream"))
    check_ranges("task", options)
    strategy = _plain(cfg.strategy)
    check_like_file("strategy", strategy, file_defaults("strategy", strategy.get("name")))
    check_ranges("strategy", {k: v for k, v in strategy.items() if k != "name"})
    optim = _plain(cfg.optim)
    check_like_file("optim", optim, file_defaults("optim", optim.get("name")))
    check_ranges("optim", {k: v for k, v in optim.items() if k != "name"})
    _check_model(_plain(cfg.model))
    _check_run_dir(cfg)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and _no_gpu_device_files():
        _fail(f"trainer.accelerator: '{cfg.trainer.accelerator}' but this machine has no CUDA GPU "
              "(use trainer.accelerator=cpu or auto)")


def check_declared_options(cfg: DictConfig) -> None:
    """Task and strategy options against the annotations of their builders (imports them)."""
    from nlcl.strategies import STRATEGIES
    from nlcl.streams import STREAMS

    task = _plain(cfg.task)
    stream = STREAMS.get(task.get("stream"))
    if stream is not None:
        check_declared("task", stream, {k: v for k, v in task.items()
                                        if k not in ("stream", "first_experiences", "validation_per_class", "token_dir")})
    strategy = _plain(cfg.strategy)
    if strategy.get("name") in STRATEGIES:
        check_declared("strategy", STRATEGIES[strategy["name"]], {k: v for k, v in strategy.items() if k != "name"})
