"""Self-modifying Titans (Nested Learning, arXiv 2512.24695, §8, Eqs. 83-93) as a sequence mixer.

Read top to bottom: config -> pure math (activation, DGD closed form, one chunk of a fast matrix)
-> in-context memories (state, read, inner gradient, chunk step) -> the layer (generation phase,
main-memory phase, output) -> `reference_forward`, the token-by-token version the tests compare to.

What the layer computes for each head (fast weights batched over batch x heads, never shared):

  inputs    u_q, u_k, u_v = SiLU(causal depthwise conv4(x W_q|k|v))          static, slowest level
  generate  k_t = l2norm(M_k(u_k,t)),  v_t = M_v(u_v,t),  q_t = l2norm(u_q,t)    (Eqs. 83-85)
            eta_t = eta_max sigmoid(M_eta(u_k,t)),  alpha_t = sigmoid(M_alpha(u_k,t))
  targets   v_hat_{m,t} = M_m(v_t) for every memory m                         (self-generated values)
  read      o_t = M_memory,t-1(q_t)                          (running state, before token t's write)
  write     M_m <- M_m (alpha_t I - eta_t k_t k_t^T) - eta_t grad L(M_m; k_t, v_hat_{m,t})  (Eq. 88)
  output    W_o (RMSNorm(o_t) * SiLU(x_t W_g))                                 (Titans-style)

With `adaptive_q` the query is l2norm(M_q(u_q,t)); with `adaptive_k`/`adaptive_v` off, k/v are the
static inputs themselves. k, v, q and the main memory are residual MLPs M(x) = x + W1 s(W2 x);
eta and alpha are one output per head, w1^T s(W2 x) + b. Every memory's initial state (W1, W2, b)
is a meta-learned nn.Parameter; the fast copies start from it for every sequence.

Choices the paper leaves open:
  * Inner gradient. `l2`: grad of 1/2 ||M(k) - v_hat||^2; `dot`: grad of -<M(k), v_hat> (Eq. 92
    with its sign corrected). v_hat is a constant target *inside* the inner gradient (Eq. 93), but
    nothing is detached for the outer gradient: it flows through v_hat, through every write, into
    the generators of k, v, eta, alpha and every initial state.
  * DGD on an MLP. The (alpha I - eta k k^T) factor acts on W2 (the matrix whose input is k); W1
    gets plain retention alpha plus its gradient; the bias b of eta/alpha gets its gradient only,
    no retention (retention would pull b, which holds the gate's default, towards 0). The
    generator's eta plays the role of DGD's eta' = eta/(1+eta) (see `dgd_closed_form`).
  * Chunking. Everything inside a chunk (k, v, q, eta, alpha, v_hat, inner gradients) comes from
    the states at the previous chunk's end; chunk_size_other for the k/v/q/eta/alpha memories,
    chunk_size_memory for the main memory. Only the main memory's read uses the running state.
    A ragged last chunk is just shorter (nothing comes after it, so no padding is needed).
  * Momentum (Titans-style, ablated in Table 6): S_t = beta S_{t-1} - eta_t grad_t,
    W_t = W_{t-1}(alpha_t I - eta_t k_t k_t^T) + S_t; beta = 0 is Eq. 88 exactly. Reset per sequence.
  * eta and alpha memories read the key path's input u_k (no extra projections).

Stability (measured on random inputs, d=128, 4 heads, T=1024, chunks 16 and 64): the inner
dynamics stay bounded with `l2` for eta up to about 0.4 and with `dot` (whose self-generated target
rewards growth) up to about 0.1-0.2; momentum multiplies the effective step by 1/(1-beta); past
that the fast weights blow up. Hence eta_max = 0.3 and eta_init = 0.05 by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SelfModifyingTitansConfig:
    d_model: int = 128
    n_heads: int = 4
    head_dim: Optional[int] = None  # default d_model // n_heads
    memory_hidden: Optional[int] = None  # hidden width of every memory MLP; default head_dim
    activation: str = "silu"  # silu | gelu: the memories' s(.)
    chunk_size_memory: int = 64  # main memory
    chunk_size_other: int = 64  # k, v, q, eta, alpha memories
    inner_objective: str = "l2"  # l2 | dot
    update_rule: str = "dgd"  # dgd | gd (gd drops the -eta k k^T factor)
    retention: bool = True  # off: alpha = 1 exactly (the alpha memory's parameters are kept, unused)
    momentum: float = 0.0  # beta of Titans-style momentum on the inner gradient; 0 = off
    adaptive_k: bool = True  # off: k is the static projection (moved to the slowest level)
    adaptive_v: bool = True
    adaptive_q: bool = False  # §8.1: q is "the only non-adaptive projection"
    conv_size: int = 4
    eta_max: float = 0.3  # eta = eta_max * sigmoid(.); see "Stability" above
    eta_init: float = 0.05  # eta at initialisation (through the eta memory's bias)
    alpha_init: float = 0.99  # alpha at initialisation (through the alpha memory's bias)
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.d_model // self.n_heads
        if self.memory_hidden is None:
            self.memory_hidden = self.head_dim
        for name, value, allowed in [
            ("activation", self.activation, ("silu", "gelu")),
            ("inner_objective", self.inner_objective, ("l2", "dot")),
            ("update_rule", self.update_rule, ("dgd", "gd")),
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (0.0 < self.eta_init < self.eta_max and 0.0 < self.alpha_init < 1.0):
            raise ValueError("need 0 < eta_init < eta_max and 0 < alpha_init < 1")
        if min(self.chunk_size_memory, self.chunk_size_other) < 1:
            raise ValueError("chunk sizes must be >= 1")


# ----------------------------------------------------------------------------------------------
# Pure math


def activation_and_derivative(z: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """s(z) and s'(z); the inner gradient of W2 needs s' explicitly (it is not autograd's job)."""
    if name == "silu":
        sig = torch.sigmoid(z)
        return z * sig, sig * (1 + z * (1 - sig))
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # exact GELU
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return z * cdf, cdf + z * pdf


def dgd_closed_form(W: Tensor, x: Tensor, u: Tensor, eta: float | Tensor) -> Tensor:
    """Delta Gradient Descent step (Eq. 57) for ||x|| = 1: the exact minimiser of
    1/2 ||W' x - u||^2 + 1/(2 eta) ||W' - W||^2 is W (I - eta' x x^T) + eta' u x^T, eta' = eta/(1+eta).
    The layer's generator outputs eta' directly, so its write is this with retention added."""
    eta_p = eta / (1 + eta)
    return W - eta_p * torch.outer(W @ x, x) + eta_p * torch.outer(u, x)


class ChunkDecay(NamedTuple):
    """Retention and momentum coefficients of one chunk, shared by every matrix written with the
    same alpha_t (see `fast_matrix_chunk` for the formula they enter). "prev" rows belong to the
    state before token t's write (row t holds what row t-1 of the inclusive matrix holds)."""

    gamma_prev: Tensor  # [N, C] gamma_{t-1} = prod_{j<t} alpha_j
    G_prev: Tensor  # [N, C, C] gamma_{t-1} / gamma_j for j < t, else 0
    D_prev: Tensor  # [N, C, C] G_prev @ Bm (momentum-weighted; = G_prev when beta = 0)
    d0_prev: Optional[Tensor]  # [N, C] G_prev @ beta^j: weight of the chunk-start momentum
    gamma_last: Tensor  # [N] gamma_C
    D_last: Tensor  # [N, C] last row of the inclusive D
    G_last: Tensor  # [N, C]
    d0_last: Optional[Tensor]  # [N]
    beta: float


def shift_down(t: Tensor, dim: int) -> Tensor:
    """Row t <- row t-1 and row 0 <- 0 along `dim`."""
    t = t.movedim(dim, -1)
    return F.pad(t[..., :-1], (1, 0)).movedim(-1, dim)


def chunk_decay(log_alpha: Tensor, beta: float) -> ChunkDecay:
    """Coefficients for W_t = alpha_t W_{t-1} + S_t - ..., S_t = beta S_{t-1} + ..., within a chunk."""
    C = log_alpha.shape[1]
    idx = torch.arange(C, device=log_alpha.device)
    incl = idx[:, None] >= idx[None, :]
    log_gamma = log_alpha.cumsum(-1)
    diff = log_gamma[:, :, None] - log_gamma[:, None, :]
    G = torch.exp(diff.masked_fill(~incl, float("-inf")))  # gamma_t / gamma_j for j <= t
    D, d0 = G, None
    if beta > 0:
        Bm = (beta ** (idx[:, None] - idx[None, :]).clamp(min=0).to(G.dtype)) * incl  # beta^(j-l), l <= j
        D = G @ Bm
        d0 = G @ (beta ** (idx + 1).to(G.dtype))  # sum_j G[t,j] beta^j
    return ChunkDecay(
        gamma_prev=torch.exp(shift_down(log_gamma, 1)),
        G_prev=shift_down(G, 1),
        D_prev=shift_down(D, 1),
        d0_prev=None if d0 is None else shift_down(d0, 1),
        gamma_last=torch.exp(log_gamma[:, -1]),
        D_last=D[:, -1],
        G_last=G[:, -1],
        d0_last=None if d0 is None else d0[:, -1],
        beta=beta,
    )


def fast_matrix_chunk(
    W0: Tensor,  # [N, dout, din] state at chunk start
    S0: Optional[Tensor],  # [N, dout, din] momentum at chunk start (None when beta == 0)
    x: Tensor,  # [N, C, din] inputs of the matrix (keys)
    u: Tensor,  # [N, C, dout] output-side gradient vectors, from the chunk-start state
    eta: Tensor,  # [N, C] learning rate
    decay: ChunkDecay,  # from chunk_decay(log alpha, beta)
    erase: Optional[Tensor] = None,  # [N, C] DGD erasure strength (eta for DGD); None: plain GD
    queries: Optional[Tensor] = None,  # [N, C, din]: also return W_{t-1} y_t for each t
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """One chunk of   W_t = W_{t-1} (alpha_t I - erase_t x_t x_t^T) + S_t,
                      S_t = beta S_{t-1} - eta_t u_t x_t^T,
    solved in parallel: a gated delta rule whose writes are rank-1 gradients, WY/UT-style.

    Unrolled with gamma_t = prod_{j<=t} alpha_j, every state in the chunk is
        W_t = gamma_t W0 + d0_t S0 - sum_{j<=t} G[t,j] erase_j r_j x_j^T - sum_{l<=t} D[t,l] eta_l u_l x_l^T
    with G[t,j] = gamma_t / gamma_j, D = G @ Bm, Bm[j,l] = beta^(j-l), d0 = G @ beta^j, and
    r_j = W_{j-1} x_j, what the state currently maps x_j to (what DGD erases). Reading that formula
    at y = x_i gives a unit lower-triangular system for all r_i at once.
    Returns (W_C, S_C, W_{t-1} y_t for every t)."""
    C = x.shape[1]
    u_eta = u * eta[..., None]

    def read(y: Tensor, r: Optional[Tensor]) -> Tensor:
        """W_{t-1} y_t for every t of the chunk: a causally masked matrix product."""
        yx = y @ x.transpose(1, 2)  # [N, C, C]
        out = decay.gamma_prev[..., None] * (y @ W0.transpose(1, 2)) - (decay.D_prev * yx) @ u_eta
        if S0 is not None:
            out = out + decay.d0_prev[..., None] * (y @ S0.transpose(1, 2))
        if r is not None:
            out = out - (decay.G_prev * yx) @ (r * erase[..., None])
        return out

    r = None
    if erase is not None:
        rhs = read(x, None)  # everything but the erasures themselves
        lower = decay.G_prev * (x @ x.transpose(1, 2)) * erase[:, None, :]
        eye = torch.eye(C, dtype=x.dtype, device=x.device)
        r = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)

    # state after the chunk: the last row of the unrolled formula
    W = decay.gamma_last[:, None, None] * W0 - (u_eta * decay.D_last[..., None]).transpose(1, 2) @ x
    if r is not None:
        W = W - (r * (decay.G_last * erase)[..., None]).transpose(1, 2) @ x
    S = None
    if S0 is not None:
        W = W + decay.d0_last[:, None, None] * S0
        beta = decay.beta
        to_end = beta ** torch.arange(C - 1, -1, -1, device=x.device).to(x.dtype)  # beta^(C-l)
        S = beta**C * S0 - (u_eta * to_end[..., None]).transpose(1, 2) @ x

    reads = read(queries, r) if queries is not None else None
    return W, S, reads


# ----------------------------------------------------------------------------------------------
# In-context memories


class MemoryState(NamedTuple):
    """Fast weights of one memory for every (sequence, head): N = batch * heads."""

    w1: Tensor  # [N, dout, hidden]
    w2: Tensor  # [N, hidden, din]
    b: Optional[Tensor]  # [N, 1, 1] (scalar memories only)
    s1: Optional[Tensor]  # momentum buffers (None when momentum == 0)
    s2: Optional[Tensor]
    sb: Optional[Tensor]


class InContextMemory(nn.Module):
    """Meta-learned initial state of one memory, for every head.

    residual=True: M(x) = x + W1 s(W2 x) (k, v, q, main memory).
    residual=False: M(x) = w1^T s(W2 x) + b, one output per head (eta, alpha), b set by `bias_init`."""

    def __init__(self, heads: int, dim: int, hidden: int, residual: bool, bias_init: float = 0.0):
        super().__init__()
        self.residual = residual
        dout = dim if residual else 1
        self.w2 = nn.Parameter(torch.randn(heads, hidden, dim) / math.sqrt(dim))
        # small W1: the residual memories start near identity, the scalar ones near their bias
        self.w1 = nn.Parameter(torch.randn(heads, dout, hidden) * (0.5 / math.sqrt(hidden)))
        self.b = None if residual else nn.Parameter(torch.full((heads, 1, 1), float(bias_init)))

    def initial_state(self, batch: int, momentum: bool) -> MemoryState:
        def per_sequence(p):  # [H, ...] -> [B*H, ...]; a view, so the outer gradient reaches p
            return None if p is None else p.unsqueeze(0).expand(batch, *p.shape).reshape(-1, *p.shape[1:])

        w1, w2, b = per_sequence(self.w1), per_sequence(self.w2), per_sequence(self.b)
        zeros = lambda t: None if (t is None or not momentum) else torch.zeros_like(t)  # noqa: E731
        return MemoryState(w1, w2, b, zeros(w1), zeros(w2), zeros(b))


def stack_states(states: list[MemoryState]) -> MemoryState:
    """Memories of equal shape as one batch: [n * N, ...]."""
    return MemoryState(*(None if f[0] is None else torch.cat(f) for f in zip(*states)))


def memory_forward(state: MemoryState, x: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """M(x) for x [N, C, din]; also returns the hidden pre-activation z and activation h."""
    z = x @ state.w2.transpose(1, 2)
    h, _ = activation_and_derivative(z, activation)
    out = h @ state.w1.transpose(1, 2)
    out = out + state.b if state.b is not None else out + x
    return out, z, h


def inner_gradients(state: MemoryState, keys: Tensor, values: Tensor, objective: str, activation: str):
    """Rank-1 factors of the inner gradient at this (chunk-start) state, for every token:
    grad W1 = e h^T, grad W2 = g k^T, grad b = e, with e = dLoss/dM(k) and v_hat = M(v) held constant."""
    v_hat, _, _ = memory_forward(state, values, activation)
    pred, z, h = memory_forward(state, keys, activation)
    e = pred - v_hat if objective == "l2" else -v_hat
    _, ds = activation_and_derivative(z, activation)
    g = (e @ state.w1) * ds
    return e, g, h


def memory_chunk_step(
    state: MemoryState,
    keys: Tensor,  # [N, C, dh] unit-norm
    values: Tensor,  # [N, C, dh]
    eta: Tensor,  # [N, C]
    decay: ChunkDecay,  # retention alpha (and momentum) of this chunk
    cfg: SelfModifyingTitansConfig,
    bias_decay: Optional[ChunkDecay] = None,  # alpha = 1: for the scalar memories' bias
    queries: Optional[Tensor] = None,  # [N, C, dh]: read M_{t-1}(q_t) with the running state
) -> tuple[MemoryState, Optional[Tensor]]:
    """All writes of one chunk (Eq. 88 with chunk-start gradients) and, optionally, the reads."""
    e, g, h = inner_gradients(state, keys, values, cfg.inner_objective, cfg.activation)
    erase = eta if cfg.update_rule == "dgd" else None
    # W2: the DGD factor (alpha I - eta k k^T) acts here, since W2's input is k
    w2, s2, z_q = fast_matrix_chunk(state.w2, state.s2, keys, g, eta, decay, erase, queries)
    h_q = activation_and_derivative(z_q, cfg.activation)[0] if queries is not None else None
    # W1: plain retention alpha plus its gradient (its rank-1 inputs are the chunk-start hidden h)
    w1, s1, read = fast_matrix_chunk(state.w1, state.s1, h, e, eta, decay, None, h_q)
    b, sb = None, None
    if state.b is not None:  # bias: its gradient only, no retention
        b, sb, _ = fast_matrix_chunk(state.b, state.sb, torch.ones_like(e), e, eta, bias_decay)
    out = queries + read if queries is not None else None  # the main memory is residual
    return MemoryState(w1, w2, b, s1, s2, sb), out


# ----------------------------------------------------------------------------------------------
# The layer


def causal_depthwise_conv(x: Tensor, weight: Tensor) -> Tensor:
    """x [B, T, c], weight [c, 1, width]: each channel sees its last `width` inputs."""
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight, groups=x.shape[-1])
    return y.transpose(1, 2)


class Generated(NamedTuple):
    """Per-token quantities from the generation phase, flattened to N = B*H sequences: [N, T, ...]."""

    q: Tensor
    k: Tensor
    v: Tensor
    eta: Tensor
    log_alpha: Tensor


class SelfModifyingTitans(nn.Module):
    def __init__(self, cfg: SelfModifyingTitansConfig):
        super().__init__()
        self.cfg = cfg
        d, H, dh, m = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.memory_hidden
        inner = H * dh
        # static projections and short convolutions: the memories' inputs (slowest level)
        self.proj_q = nn.Linear(d, inner, bias=False)
        self.proj_k = nn.Linear(d, inner, bias=False)
        self.proj_v = nn.Linear(d, inner, bias=False)
        self.conv_q = nn.Parameter(torch.randn(inner, 1, cfg.conv_size) / math.sqrt(cfg.conv_size))
        self.conv_k = nn.Parameter(torch.randn(inner, 1, cfg.conv_size) / math.sqrt(cfg.conv_size))
        self.conv_v = nn.Parameter(torch.randn(inner, 1, cfg.conv_size) / math.sqrt(cfg.conv_size))
        # in-context memories (initial states)
        mem = {"memory": InContextMemory(H, dh, m, residual=True)}
        for name, on in [("k", cfg.adaptive_k), ("v", cfg.adaptive_v), ("q", cfg.adaptive_q)]:
            if on:
                mem[name] = InContextMemory(H, dh, m, residual=True)
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731 (sigmoid^-1: the biases set the initial gates)
        mem["eta"] = InContextMemory(H, dh, m, residual=False, bias_init=logit(cfg.eta_init / cfg.eta_max))
        mem["alpha"] = InContextMemory(H, dh, m, residual=False, bias_init=logit(cfg.alpha_init))
        self.memories = nn.ModuleDict(mem)
        # output: per-head RMSNorm, SiLU gate, projection
        self.out_norm = nn.Parameter(torch.ones(dh))
        self.proj_gate = nn.Linear(d, inner, bias=False)
        self.proj_out = nn.Linear(inner, d, bias=False)

    # --- pieces shared with reference_forward ----------------------------------------------------

    def memory_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u_q, u_k, u_v as [N, T, dh] (N = B*H): projection, causal conv, SiLU."""
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim

        def path(proj, conv):
            u = F.silu(causal_depthwise_conv(proj(x), conv))
            return u.view(B, T, H, dh).transpose(1, 2).reshape(B * H, T, dh)

        return path(self.proj_q, self.conv_q), path(self.proj_k, self.conv_k), path(self.proj_v, self.conv_v)

    def other_memory_groups(self) -> list[list[str]]:
        """Memories updated at chunk_size_other, in groups of equal shape that run as one batch:
        the residual k/v/q memories and the scalar eta/alpha ones (alpha idle without retention)."""
        residual = [n for n in ("k", "v", "q") if n in self.memories]
        scalar = ["eta", "alpha"] if self.cfg.retention else ["eta"]
        return [g for g in (residual, scalar) if g]

    def generated(self, raw: dict[str, Tensor], u_q, u_k, u_v):
        """q, k, v, eta, log alpha from the memories' raw reads (or the static inputs when a
        projection is not adaptive)."""
        cfg, eps = self.cfg, self.cfg.norm_eps
        k = F.normalize(raw["k"] if cfg.adaptive_k else u_k, dim=-1, eps=eps)
        v = raw["v"] if cfg.adaptive_v else u_v
        q = F.normalize(raw["q"] if cfg.adaptive_q else u_q, dim=-1, eps=eps)
        eta = cfg.eta_max * torch.sigmoid(raw["eta"][..., 0])
        # without retention alpha is exactly 1
        log_alpha = F.logsigmoid(raw["alpha"][..., 0]) if cfg.retention else torch.zeros_like(eta)
        return q, k, v, eta, log_alpha

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """o [N, T, dh] -> per-head RMSNorm, SiLU(x W_g) gate, output projection -> [B, T, d]."""
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps) * self.out_norm
        o = o.view(B, H, T, dh).transpose(1, 2).reshape(B, T, H * dh)
        return self.proj_out(o * F.silu(self.proj_gate(x)))

    # --- chunk-parallel forward ---------------------------------------------------------------------

    def generate(self, x: Tensor) -> Generated:
        """Phase 1: run the k/v/q/eta/alpha memories over chunks of chunk_size_other. Memories of
        equal shape are stacked along the batch dimension (they share k, v, eta, alpha)."""
        cfg = self.cfg
        B, T, _ = x.shape
        C = cfg.chunk_size_other
        u_q, u_k, u_v = self.memory_inputs(x)
        inputs = {"k": u_k, "v": u_v, "q": u_q, "eta": u_k, "alpha": u_k}  # eta, alpha: the key path
        groups = self.other_memory_groups()
        initial = lambda n: self.memories[n].initial_state(B, cfg.momentum > 0)  # noqa: E731
        states = [stack_states([initial(n) for n in g]) for g in groups]
        pieces = []
        for start in range(0, T, C):  # the last chunk may be shorter: nothing after it to reach
            sl = slice(start, start + C)
            raw = {}  # reads from the chunk-start states (Eqs. 83-85)
            for g, state in zip(groups, states):
                out, _, _ = memory_forward(state, torch.cat([inputs[n][:, sl] for n in g]), cfg.activation)
                raw.update(zip(g, out.chunk(len(g))))
            q, k, v, eta, log_alpha = self.generated(raw, u_q[:, sl], u_k[:, sl], u_v[:, sl])
            pieces.append((q, k, v, eta, log_alpha))
            if start + C >= T:
                break  # the last chunk's writes would never be read
            for i, g in enumerate(groups):  # writes: every memory regresses M(k) onto its own M(v)
                n, state = len(g), states[i]
                decay = chunk_decay(log_alpha.repeat(n, 1), cfg.momentum)
                no_retention = None  # for the biases of eta/alpha
                if state.b is not None:
                    no_retention = chunk_decay(torch.zeros_like(log_alpha).repeat(n, 1), cfg.momentum)
                states[i], _ = memory_chunk_step(
                    state, k.repeat(n, 1, 1), v.repeat(n, 1, 1), eta.repeat(n, 1), decay, cfg, no_retention
                )
        return Generated(*(torch.cat(p, dim=1) for p in zip(*pieces)))

    def main_memory(self, gen: Generated, batch: int) -> Tensor:
        """Phase 2: the main memory over chunks of chunk_size_memory; returns o_t = M_{t-1}(q_t)."""
        cfg = self.cfg
        C, T = cfg.chunk_size_memory, gen.k.shape[1]
        state = self.memories["memory"].initial_state(batch, cfg.momentum > 0)
        outs = []
        for start in range(0, T, C):
            q, k, v, eta, log_alpha = (t[:, start : start + C] for t in gen)
            decay = chunk_decay(log_alpha, cfg.momentum)
            state, o = memory_chunk_step(state, k, v, eta, decay, cfg, queries=q)
            outs.append(o)
        return torch.cat(outs, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.main_memory(self.generate(x), x.shape[0]), x)


# ----------------------------------------------------------------------------------------------
# Sequential reference (tests only): one token at a time, same parameters, same semantics.


_MOMENTUM_OF = {"w1": "s1", "w2": "s2", "b": "sb"}


def _reference_apply(mem: dict, x: Tensor, activation: str) -> Tensor:
    """M(x) for one token x [N, din]: x + W1 s(W2 x), or w1^T s(W2 x) + b for the scalar memories."""
    h, _ = activation_and_derivative(torch.einsum("nhi,ni->nh", mem["w2"], x), activation)
    out = torch.einsum("noh,nh->no", mem["w1"], h)
    return out + mem["b"][:, 0] if mem["b"] is not None else out + x


def _reference_write(running: dict, start: dict, k, v, eta, alpha, cfg: SelfModifyingTitansConfig) -> dict:
    """One token's write (Eq. 88), the gradient taken at the chunk-start state `start`:
    W2 <- W2 (alpha I - eta k k^T) + S2,  W1 <- alpha W1 + S1,  b <- b + Sb,  S <- beta S - eta grad."""
    names = ["w1", "w2"] + (["b"] if start["b"] is not None else [])
    # the inner gradient of one token (its formula is checked against autograd in the tests)
    state = MemoryState(start["w1"], start["w2"], start["b"], None, None, None)
    e, g, h = inner_gradients(state, k[:, None], v[:, None], cfg.inner_objective, cfg.activation)
    e, g, h = e[:, 0], g[:, 0], h[:, 0]
    outer = lambda a, b: torch.einsum("no,ni->noi", a, b)  # noqa: E731
    grads = {"w1": outer(e, h), "w2": outer(g, k), "b": e[..., None]}

    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    factor = alpha[:, None, None] * eye  # the factor acting on W2, whose input is k
    if cfg.update_rule == "dgd":
        factor = factor - eta[:, None, None] * torch.einsum("ni,nj->nij", k, k)
    retain = {"w1": alpha[:, None, None], "b": 1.0}  # W1: plain retention; b: none

    new = {}
    for n in names:
        s = new[_MOMENTUM_OF[n]] = cfg.momentum * running[_MOMENTUM_OF[n]] - eta[:, None, None] * grads[n]
        kept = running[n] @ factor if n == "w2" else retain[n] * running[n]
        new[n] = kept + s
    new.setdefault("b", None)
    new.setdefault("sb", None)
    return new


def reference_forward(layer: SelfModifyingTitans, x: Tensor) -> Tensor:
    """Token-by-token self-modifying Titans, as plainly as possible (tests only).

    At each token: (1) at chunk boundaries, snapshot the states; (2) generate q, k, v, eta, alpha
    from the chunk-start states; (3) read o_t = M_memory(q_t) from the running state; (4) write
    every memory with its gradient at its chunk-start state."""
    cfg = layer.cfg
    B, T, _ = x.shape
    u_q, u_k, u_v = layer.memory_inputs(x)

    def fresh(mem: InContextMemory) -> dict:
        state = mem.initial_state(B, momentum=False)  # [B*H, ...] copies of the initial state
        state = {"w1": state.w1, "w2": state.w2, "b": state.b}
        momenta = {_MOMENTUM_OF[n]: None if t is None else torch.zeros_like(t) for n, t in state.items()}
        return state | momenta

    running = {name: fresh(mem) for name, mem in layer.memories.items()}
    apply = lambda mem, u: _reference_apply(mem, u, cfg.activation)  # noqa: E731
    outputs = []
    for t in range(T):
        # snapshots: states are replaced, never modified in place, so a dict copy is enough
        if t % cfg.chunk_size_other == 0:
            start_other = dict(running)
        if t % cfg.chunk_size_memory == 0:
            start_main = running["memory"]
        start = start_other | {"memory": start_main}
        k = apply(start["k"], u_k[:, t]) if cfg.adaptive_k else u_k[:, t]
        k = F.normalize(k, dim=-1, eps=cfg.norm_eps)
        v = apply(start["v"], u_v[:, t]) if cfg.adaptive_v else u_v[:, t]
        q = apply(start["q"], u_q[:, t]) if cfg.adaptive_q else u_q[:, t]
        q = F.normalize(q, dim=-1, eps=cfg.norm_eps)
        eta = cfg.eta_max * torch.sigmoid(apply(start["eta"], u_k[:, t])[:, 0])
        alpha = torch.ones_like(eta)
        if cfg.retention:
            alpha = torch.sigmoid(apply(start["alpha"], u_k[:, t])[:, 0])

        outputs.append(apply(running["memory"], q))  # read before this token's write
        for n in sum(layer.other_memory_groups(), []) + ["memory"]:
            running[n] = _reference_write(running[n], start[n], k, v, eta, alpha, cfg)
    return layer.output(torch.stack(outputs, dim=1), x)
