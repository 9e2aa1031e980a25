"""Continual-learning strategies as Lightning callbacks."""
from __future__ import annotations

from nlcl.strategies.base import Strategy
from nlcl.strategies.regularization import EWC, SI, LwF
from nlcl.strategies.rehearsal import AGEM, Cumulative, DERPlusPlus, Joint, Replay

# name -> class; each class takes its config fields as keyword arguments
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Strategy, Joint, Cumulative, Replay, AGEM, DERPlusPlus, EWC, SI, LwF)}


def strategy_names() -> list[str]:
    return sorted(STRATEGIES)


def build_strategy(name: str | None, _target_: str | None = None, **kwargs) -> Strategy:
    """A built-in by name, or `_target_`: a Strategy subclass (or a function returning one) called with kwargs."""
    if _target_ is not None:
        from nlcl.plugins import PluginError, call_target

        strategy = call_target({"_target_": _target_, **kwargs}, "strategy")
        if not isinstance(strategy, Strategy):
            raise PluginError(f"strategy._target_: {_target_} returned {type(strategy).__name__}, not a "
                              "nlcl.strategies.Strategy")
        return strategy
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name: unknown strategy '{name}'; allowed: {strategy_names()}")
    try:
        return STRATEGIES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"strategy '{name}': {e}") from None


__all__ = ["Strategy", "STRATEGIES", "build_strategy", "strategy_names",
           "Joint", "Cumulative", "Replay", "AGEM", "DERPlusPlus", "EWC", "SI", "LwF"]
