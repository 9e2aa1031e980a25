"""Update levels: which parameters change how often.

A module tagged with a `LevelSpec` (attribute `nl_level`) puts all of its parameters in that level,
unless a descendant carries its own tag. Untagged parameters belong to the outer level (period 1 step).

Two units exist (docs/design.md):
- `step`: the level's optimizer steps once every `period` optimizer steps, with the sum of the
  gradients accumulated over the period (paper Eq. 71).
- `token`: the module updates fast weights inside the forward pass every `period` tokens; its
  meta-learned initial state is trained by the outer optimizer, i.e. it sits in the outer level.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

UNITS = ("step", "token")


@dataclass(frozen=True)
class LevelSpec:
    name: str
    period: int = 1
    unit: str = "step"
    lr_scale: float = 1.0

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"level '{self.name}': unit must be one of {UNITS}, got '{self.unit}'")
        if int(self.period) < 1:
            raise ValueError(f"level '{self.name}': period must be >= 1, got {self.period}")


OUTER = LevelSpec("outer", 1, "step")


def tag(module: nn.Module, spec: LevelSpec) -> nn.Module:
    """Put every parameter of `module` in level `spec` (descendants' own tags win)."""
    module.nl_level = spec
    return module


def parameter_levels(model: nn.Module) -> dict[str, LevelSpec]:
    """Map every trainable parameter name to the step-unit level that updates it.

    Token-unit levels update in-context; their initial states are trained by the outer optimizer,
    so for optimizer purposes they resolve to OUTER.
    """
    levels: dict[str, LevelSpec] = {}

    def visit(module: nn.Module, prefix: str, inherited: LevelSpec):
        spec = getattr(module, "nl_level", None) or inherited
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                levels[prefix + name] = spec if spec.unit == "step" else OUTER
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}.", spec)

    visit(model, "", OUTER)
    return levels
