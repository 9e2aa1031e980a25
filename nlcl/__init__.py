"""nlcl: continual-learning experiments around Nested Learning's Hope."""
from omegaconf import OmegaConf

# `${join:${model.cms.periods}}` -> "1-8-64": readable run labels from list-valued settings
if not OmegaConf.has_resolver("join"):
    OmegaConf.register_new_resolver("join", lambda xs, sep="-": sep.join(str(x) for x in xs))

__version__ = "0.1.0"

# The Python API, imported on first use (the runner pulls in Lightning):
#   cfg = nlcl.compose([...]); nlcl.validate(cfg); results = nlcl.run(cfg); runs, left_out = nlcl.load_runs([...])
_API = {"compose": "nlcl.config", "validate": "nlcl.config", "ConfigError": "nlcl.config", "run": "nlcl.runner",
        "load_runs": "nlcl.report", "load_plugins": "nlcl.plugins"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'nlcl' has no attribute {name!r}")
