"""nlcl: continual-learning experiments around Nested Learning's Hope."""
from omegaconf import OmegaConf

# `${join:${model.cms.periods}}` -> "1-8-64": readable run labels from list-valued settings
if not OmegaConf.has_resolver("join"):
    OmegaConf.register_new_resolver("join", lambda xs, sep="-": sep.join(str(x) for x in xs))

__version__ = "0.1.0"
