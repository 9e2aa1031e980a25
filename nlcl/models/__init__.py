"""Pure PyTorch models (no Lightning)."""
from nlcl.models.registry import build_model, count_parameters, model_names, register_backbone, register_classifier

__all__ = ["build_model", "count_parameters", "model_names", "register_backbone", "register_classifier"]
