"""User code reachable from config, in every process nlcl starts.

Two doors, both resolved from the config itself, so joblib workers, SLURM tasks, `nlcl evaluate`
and notebooks see exactly what the launching process saw:

- `_target_: package.module.callable` in `task`, `model`, `strategy` or `optim` (Hydra's
  instantiate pattern). The short names (`model=hope`, `optim=adamw`...) stay as aliases.
- `plugins: [my_module, ...]`: modules imported before the config is validated (e.g. ones that
  call `register_backbone` or add to `STREAMS`), plus every Python entry point in the group
  `nlcl.plugins` of installed packages.

docs/plugins.md writes down what each kind of target receives and must return.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Iterable

ENTRY_POINT_GROUP = "nlcl.plugins"
_loaded: set[str] = set()


class PluginError(ValueError):
    """A plugin module or `_target_` that cannot be imported or called; names the config field."""


def load_plugins(modules: Iterable[str] | None = None, *, entry_points: bool = True) -> None:
    """Import `modules` (the config's `plugins` list) and the `nlcl.plugins` entry points, once each."""
    for i, name in enumerate(modules or []):
        if name in _loaded:
            continue
        try:
            importlib.import_module(str(name))
        except Exception as e:  # noqa: BLE001 - any failure inside the user's module
            raise PluginError(f"plugins[{i}]: cannot import '{name}' ({type(e).__name__}: {e}); the module must be "
                              "importable in every process (installed, or on PYTHONPATH)") from None
        _loaded.add(str(name))
    if entry_points:
        from importlib.metadata import entry_points as eps

        for ep in eps(group=ENTRY_POINT_GROUP):
            key = f"ep:{ep.value}"
            if key not in _loaded:
                try:
                    ep.load()
                except Exception as e:  # noqa: BLE001
                    raise PluginError(f"entry point '{ep.name}' ({ep.value}) of group {ENTRY_POINT_GROUP}: {e}") from None
                _loaded.add(key)


def target(node) -> str | None:
    """The `_target_` path of a config section, or None when it names a built-in by `name`."""
    return node.get("_target_") if hasattr(node, "get") else None


def resolve(path: str, field: str) -> Any:
    """The object at a dotted path, or PluginError naming `field`."""
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception as e:  # noqa: BLE001 - hydra raises ImportError / ValueError variants
        raise PluginError(f"{field}: cannot import '{path}' ({e})") from None


def accepted(fn, context: dict) -> dict:
    """The entries of `context` that `fn` takes as keyword arguments (all of them with **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(context)
    return {k: v for k, v in context.items() if k in params}


def call_target(options: dict, field: str, context: dict | None = None, drop: Iterable[str] = ("name",)) -> Any:
    """Call `options['_target_']` with the other options plus the context entries it asks for.

    `drop` lists labels that are nlcl's, not the target's (a section's `name` labels folders and
    reports). Nested `_target_` nodes inside the options are instantiated by Hydra first."""
    from hydra.utils import instantiate

    options = dict(options)
    fn = resolve(options.pop("_target_"), f"{field}._target_")
    for key in drop:
        options.pop(key, None)
    kwargs = {**accepted(fn, context or {}), **options}
    try:
        kwargs = {k: instantiate(v) if isinstance(v, dict) and "_target_" in v else v for k, v in kwargs.items()}
        return fn(**kwargs)
    except TypeError as e:
        raise PluginError(f"{field}: {getattr(fn, '__qualname__', fn)}: {e}") from None
