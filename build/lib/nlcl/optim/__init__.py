"""Nested Learning optimizers and level-aware multi-frequency stepping."""
from nlcl.optim.delta import DGDOuter, DMGD, DeltaMomentum, delta_momentum_update, dgd_update
from nlcl.optim.factory import OPTIMIZERS, build_optimizer
from nlcl.optim.m3 import M3, M3Stabilized
from nlcl.optim.multifrequency import MultiFrequencyOptimizer
from nlcl.optim.muon import Muon, muon_param_groups, newton_schulz

__all__ = ["DGDOuter", "DMGD", "DeltaMomentum", "M3", "M3Stabilized", "MultiFrequencyOptimizer", "Muon",
           "OPTIMIZERS", "build_optimizer", "delta_momentum_update", "dgd_update", "muon_param_groups",
           "newton_schulz"]
