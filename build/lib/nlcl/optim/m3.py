"""M3, Multi-scale Momentum Muon (paper §7.2, Algorithm 1): "Adam + Muon + CMS".

Per 2-D weight, a fast momentum M1 (every step) and a slow momentum M2 (once every `frequency`
steps, with the gradients of the chunk that just ended), both orthogonalised by Newton–Schulz, are
summed with weight `alpha` on the slow term and divided Adam-style by sqrt(V):

    W <- W - lr (NS(M1) + alpha NS(M2)) / (sqrt(V) + eps)

`variant="literal"` is Algorithm 1 as written: un-decayed sums M1 += b1 g, V += b2 g^2,
M2 += b3 * (sum of the chunk's gradients). V grows without bound (AdaGrad-like), so the step shrinks
over time. `variant="ema"` (`M3Stabilized`) replaces the three sums by bias-corrected EMAs
(M2 is an EMA of the chunk-mean gradient). In both, the slow term used during a chunk comes from
the gradients of the previous chunk, and it is zero during the first chunk.

Other parameters (biases, norms, embeddings, heads: groups with `use_muon=False`) take AdamW.
Default hyperparameters are ours: the paper gives none.
"""
from __future__ import annotations

import torch

from nlcl.optim.muon import NS_COEFFICIENTS, HybridOptimizer, _ns_dtype, newton_schulz

VARIANTS = ("literal", "ema")


class M3(HybridOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999, 0.9), alpha: float = 1.0,
                 frequency: int = 8, eps: float = 1e-8, variant: str = "literal", ns_steps: int = 5,
                 ns_coefficients=NS_COEFFICIENTS, ns_dtype: torch.dtype | None = None,
                 weight_decay: float = 0.0, adamw_lr: float = 3e-4, adamw_betas=(0.9, 0.95),
                 adamw_eps: float = 1e-8):
        if variant not in VARIANTS:
            raise ValueError(f"M3 variant must be one of {VARIANTS}, got '{variant}'")
        if int(frequency) < 1:
            raise ValueError(f"M3 frequency must be >= 1, got {frequency}")
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, frequency=int(frequency), eps=eps,
                        variant=variant, ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients),
                        ns_dtype=ns_dtype, weight_decay=weight_decay, adamw_betas=tuple(adamw_betas),
                        adamw_eps=adamw_eps)
        super().__init__(params, defaults, adamw_lr)

    def _orthogonal_step(self, group: dict):
        b1, b2, b3 = group["betas"]
        f, ema = group["frequency"], group["variant"] == "ema"
        ns = dict(steps=group["ns_steps"], coefficients=group["ns_coefficients"])
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["chunks"] = 0
                for key in ("m1", "v", "m2", "o2", "chunk_sum"):
                    state[key] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            m1, v = state["m1"], state["v"]
            state["chunk_sum"].add_(g)
            if ema:
                m1.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m1_hat, v_hat = m1 / (1 - b1 ** t), v / (1 - b2 ** t)
            else:
                m1.add_(g, alpha=b1)
                v.addcmul_(g, g, value=b2)
                m1_hat, v_hat = m1, v
            o1 = newton_schulz(m1_hat, **ns, dtype=_ns_dtype(group, p))
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(o1 + group["alpha"] * state["o2"], v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
            if t % f == 0:  # the chunk ends: fold its gradients into the slow memory, for the next chunk
                state["chunks"] += 1
                m2 = state["m2"]
                if ema:
                    m2.lerp_(state["chunk_sum"] / f, 1 - b3)
                    m2_hat = m2 / (1 - b3 ** state["chunks"])
                else:
                    m2.add_(state["chunk_sum"], alpha=b3)
                    m2_hat = m2
                state["o2"] = newton_schulz(m2_hat, **ns, dtype=_ns_dtype(group, p))
                state["chunk_sum"].zero_()


class M3Stabilized(M3):
    """M3 with bias-corrected EMA moments instead of Algorithm 1's un-decayed sums."""

    def __init__(self, params, **kwargs):
        super().__init__(params, variant="ema", **kwargs)
