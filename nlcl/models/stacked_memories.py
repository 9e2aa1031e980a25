"""The generation phase of self-modifying Titans with its k/v/q/eta/alpha/erase memories as ONE state.

Same numbers as running `memory_chunk_step` once per memory (the float64 tests compare the layer
with the token-by-token reference), computed with far fewer and larger operations. Why that works:
at every token all these memories write with the same key k, value v, step eta, retention alpha,
erase and momentum gate (each regresses its own M(k) onto its own M(v), Eq. 88). So

  * W2 of every memory ([hidden, dh], input k) are row blocks of one matrix [N, n*hidden, dh]. The
    rule W <- W (alpha I - erase k k^T) + S acts on each row alike, so a chunk of the stacked matrix
    is a single `fast_matrix_chunk`: one Gram matrix k k^T, one set of decay coefficients and one
    triangular solve (its matrix depends on k, alpha and erase only) for all memories, where the
    per-memory form repeated each of them n times;
  * the inner gradients of all memories come from one product [k; v] W2^T (keys and values of
    the chunk together), one activation and, per memory kind, one einsum with W1;
  * W1 of the residual memories [N, r, dh, hidden], of the scalar ones [N, s, 1, hidden] and the
    scalar biases [N, s, 1, 1] keep a memory axis: their chunk-end update is an einsum over it.

Row order of the stacked W2: residual memories (v, q, k: the key memory last), then scalar ones
(eta, alpha, erase). Everything that reads the key path (the k memory and every scalar memory) is
then one contiguous block of rows, so the chunk's reads take one product per distinct input.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nlcl.models.self_modifying_titans import (
    ChunkDecay,
    SelfModifyingTitansConfig,
    activation_and_derivative,
    chunk_decay,
    clip_rows,
    fast_matrix_chunk,
    normalised_step,
)


class StackedLayout(NamedTuple):
    residual: tuple[str, ...]  # e.g. ("v", "k"): W1 [dh, hidden], output u + W1 s(W2 u)
    scalar: tuple[str, ...]  # e.g. ("eta", "alpha", "erase"): w1 [1, hidden] and a bias
    hidden: int

    @property
    def names(self) -> tuple[str, ...]:
        return self.residual + self.scalar

    def reads_of(self, name: str) -> str:
        """Which input path a memory reads: q and v their own, every other one the key path."""
        return name if name in ("q", "v") else "k"


class StackedState(NamedTuple):
    w2: Tensor  # [N, n*hidden, dh]
    w1r: Optional[Tensor]  # [N, r, dh, hidden] (None when no residual memory is adaptive)
    w1s: Tensor  # [N, s, 1, hidden]
    bs: Tensor  # [N, s, 1, 1]
    s2: Optional[Tensor]  # momentum buffers, same shapes (None without momentum)
    s1r: Optional[Tensor]
    s1s: Optional[Tensor]
    sbs: Optional[Tensor]


def stacked_layout(groups: list[list[str]], hidden: int) -> StackedLayout:
    """From the layer's `other_memory_groups()` (residual group first, if any; scalar group last)."""
    residual = [n for g in groups for n in g if n in ("k", "v", "q")]
    scalar = [n for g in groups for n in g if n not in ("k", "v", "q")]
    residual = [n for n in ("v", "q", "k") if n in residual]  # key memory last: see the module notes
    return StackedLayout(tuple(residual), tuple(scalar), hidden)


def initial_stacked_state(memories, layout: StackedLayout, batch: int, momentum: bool) -> StackedState:
    """Every sequence starts from the meta-learned initial states, [H, ...] -> [B*H, ...] copies
    (row b*H + h, as `InContextMemory.initial_state`), so the outer gradient reaches them."""

    def per_sequence(p: Tensor) -> Tensor:
        return p.unsqueeze(0).expand(batch, *p.shape).reshape(-1, *p.shape[1:])

    w2 = per_sequence(torch.cat([memories[n].w2 for n in layout.names], dim=1))
    w1r = per_sequence(torch.stack([memories[n].w1 for n in layout.residual], 1)) if layout.residual else None
    w1s = per_sequence(torch.stack([memories[n].w1 for n in layout.scalar], 1))
    bs = per_sequence(torch.stack([memories[n].b for n in layout.scalar], 1))
    zeros = (lambda t: None if t is None or not momentum else torch.zeros_like(t))  # noqa: E731
    return StackedState(w2, w1r, w1s, bs, zeros(w2), zeros(w1r), zeros(w1s), zeros(bs))


def _activation(z: Tensor, name: str) -> Tensor:
    """s(z) alone (no derivative needed): one fused kernel, the same function as
    `activation_and_derivative`'s first output."""
    return F.silu(z) if name == "silu" else F.gelu(z)


def _outputs(state: StackedState, layout: StackedLayout, h: Tensor, inputs: Tensor) -> tuple[Optional[Tensor], Tensor]:
    """M(x) of every memory from its hidden activations h [N, L, n, hidden]: residual ones
    x + W1 h ([N, L, r, dh], `inputs` [N, L, r, dh] their x), scalar ones w1^T h + b ([N, L, s, 1])."""
    r = len(layout.residual)
    h_r, h_s = h.split([r, h.shape[2] - r], dim=2)
    res = None
    if r:
        res = inputs + torch.einsum("nlrm,nrdm->nlrd", h_r, state.w1r)
    sca = torch.einsum("nlsm,nsom->nlso", h_s, state.w1s) + state.bs.transpose(1, 2)
    return res, sca


def stacked_read(state: StackedState, layout: StackedLayout, inputs: dict[str, Tensor],
                 activation: str) -> dict[str, Tensor]:
    """Raw reads of one chunk from the chunk-start state (Eqs. 83-85): name -> [N, C, dh] for the
    residual memories, [N, C, 1] for the scalar ones. `inputs`: path name ("k", "v", "q") -> [N, C, dh]."""
    m, names = layout.hidden, layout.names
    N, C, _ = inputs["k"].shape
    pieces, start = [], 0
    while start < len(names):  # runs of consecutive memories that read the same input: one product each
        path = layout.reads_of(names[start])
        end = start
        while end < len(names) and layout.reads_of(names[end]) == path:
            end += 1
        pieces.append(inputs[path] @ state.w2[:, start * m : end * m].transpose(1, 2))
        start = end
    z = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    h = _activation(z, activation).view(N, C, len(names), m)
    x = torch.stack([inputs[layout.reads_of(n)] for n in layout.residual], 2) if layout.residual else None
    res, sca = _outputs(state, layout, h, x)
    raw = {n: res[:, :, i] for i, n in enumerate(layout.residual)}
    raw.update({n: sca[:, :, j] for j, n in enumerate(layout.scalar)})
    return raw


def _chunk_end(W0: Tensor, S0: Optional[Tensor], x: Tensor, u: Tensor, eta: Tensor, decay: ChunkDecay):
    """`fast_matrix_chunk`'s chunk-end state without erasure, with a memory axis:
    W0 [N, r, dout, din], x [N, C, r, din], u [N, C, r, dout], eta [N, C, r]."""
    coef = (eta * decay.D_last[:, :, None])[..., None]
    W = decay.gamma_last[:, None, None, None] * W0 - torch.einsum("ncro,ncri->nroi", u * coef, x)
    S = None
    if S0 is not None:
        W = W + decay.d0_last[:, None, None, None] * S0
        to_end = (eta * decay.beta_to_end[:, :, None])[..., None]
        S = decay.beta_total[:, None, None, None] * S0 - torch.einsum("ncro,ncri->nroi", u * to_end, x)
    return W, S


def stacked_chunk_step(state: StackedState, layout: StackedLayout, keys: Tensor, values: Tensor, eta: Tensor,
                       erase: Optional[Tensor], log_alpha: Tensor, log_beta: Optional[Tensor],
                       cfg: SelfModifyingTitansConfig) -> StackedState:
    """All memories' writes of one chunk: `memory_chunk_step` (inner gradients at the chunk-start
    state, then W2 with the erase factor, W1 with plain retention, biases with their gradient only)."""
    N, C, dh = keys.shape
    n, r, m = len(layout.names), len(layout.residual), layout.hidden
    # inner gradients (`inner_gradients`): pred = M(k), v_hat = M(v), for every memory at once
    kv = torch.cat([keys, values], dim=1)  # [N, 2C, dh]
    z = kv @ state.w2.transpose(1, 2)
    h, ds = activation_and_derivative(z, cfg.activation)
    h, ds = h.view(N, 2 * C, n, m), ds[:, :C].view(N, C, n, m)
    res, sca = _outputs(state, layout, h, kv[:, :, None].expand(N, 2 * C, r, dh) if r else None)

    def error(out: Tensor) -> Tensor:
        pred, v_hat = out.split(C, dim=1)
        return clip_rows(pred - v_hat if cfg.inner_objective == "l2" else -v_hat, cfg.inner_grad_clip)

    # e = dLoss/dM(k) per memory, then g = (e W1) s'(z): one clip for every memory's g (per row)
    e_s = error(sca)  # [N, C, s, 1]
    e_w1 = torch.einsum("ncso,nsom->ncsm", e_s, state.w1s)
    e_r = None
    if r:
        e_r = error(res)  # [N, C, r, dh]
        e_w1 = torch.cat([torch.einsum("ncrd,nrdm->ncrm", e_r, state.w1r), e_w1], dim=2)
    g = clip_rows(e_w1 * ds, cfg.inner_grad_clip).reshape(N, C, n * m)

    decay = chunk_decay(log_alpha, log_beta)  # shared by every memory
    # W2 of all memories: one chunk of the stacked matrix (one Gram matrix, one triangular solve)
    w2, s2, _ = fast_matrix_chunk(state.w2, state.s2, keys, g, normalised_step(eta, keys), decay, erase,
                                  x_w0=z[:, :C])  # k W2^T: the keys' half of the inner forward
    # W1: plain retention, input the chunk-start hidden h (its own normalised step per memory)
    h_r, h_s = h[:, :C].split([r, n - r], dim=2)
    w1r = s1r = None
    if r:
        w1r, s1r = _chunk_end(state.w1r, state.s1r, h_r, e_r, normalised_step(eta[..., None], h_r), decay)
    w1s, s1s = _chunk_end(state.w1s, state.s1s, h_s, e_s, normalised_step(eta[..., None], h_s), decay)
    # biases: their gradient only, no retention; input the constant 1 (step eta / (1 + eta))
    step_b = eta / (1 + eta)  # [N, C]
    if log_beta is None:  # alpha = 1 and no momentum: every decay coefficient is exactly 1
        bs, sbs = state.bs - (e_s * step_b[:, :, None, None]).sum(1)[..., None], None
    else:
        bias_decay = chunk_decay(torch.zeros_like(log_alpha), log_beta)
        step_b = step_b[..., None].expand(N, C, len(layout.scalar))
        bs, sbs = _chunk_end(state.bs, state.sbs, torch.ones_like(e_s), e_s, step_b, bias_decay)
    return StackedState(w2, w1r, w1s, bs, s2, s1r, s1s, sbs)
