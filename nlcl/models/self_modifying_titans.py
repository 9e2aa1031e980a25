"""Self-modifying Titans (Nested Learning, arXiv 2512.24695, §8, Eqs. 83-93) as a sequence mixer.

Read top to bottom: config -> pure math (activation, DGD closed form, one chunk of a fast matrix)
-> in-context memories (state, read, inner gradient, chunk step) -> the layer (generation phase,
main-memory phase, output, telemetry) -> `reference_forward`, the token-by-token version the tests
compare to in float64.

What the layer computes for each head (fast weights batched over batch x heads, never shared):

  inputs    u_q, u_k, u_v = SiLU(causal depthwise conv4(x W_q|k|v))          static, slowest level
  generate  k_t = l2norm(M_k(u_k,t)),  v_t = M_v(u_v,t),  q_t = l2norm(u_q,t)    (Eqs. 83-85)
            eta_t = eta_max sigmoid(M_eta(u_k,t)),  alpha_t = sigmoid(M_alpha(u_k,t))
            erase_t = (1 + alpha_t) sigmoid(M_erase(u_k,t))          (signed eigenvalues, default)
  targets   v_hat_{m,t} = M_m(v_t) for every memory m                         (self-generated values)
  read      o_t = M_memory,t-1(q_t)                          (running state, before token t's write)
  write     W2 <- W2 (alpha_t I - erase_t k_t k_t^T) + S2,   W1 <- alpha_t W1 + S1,   b <- b + Sb
            S  <- beta_t S - eta(x)_t grad L(M_m; k_t, v_hat_{m,t}),   eta(x) = eta/(1 + eta ||x||^2)
  output    W_o (RMSNorm(o_t) * SiLU(x_t W_g))                                 (Titans-style)

With `adaptive_q` the query is l2norm(M_q(u_q,t)); with `adaptive_k`/`adaptive_v` off, k/v are the
static inputs themselves. k, v, q and the main memory are residual MLPs M(x) = x + W1 s(W2 x);
eta, alpha and erase are one output per head, w1^T s(W2 x) + b. Every memory's initial state
(W1, W2, b) is a meta-learned nn.Parameter; the fast copies start from it for every sequence.

Choices the paper leaves open (and why):
  * Chunk sizes (§8.2 does not report them). Defaults 8 for the k/v/q/eta/alpha/erase memories and
    16 for the main memory (the paper's Hope figure shows 16). Within a chunk everything comes from
    the chunk-start states, and the last chunk's writes are never read, so a memory self-modifies
    ceil(T/C) - 1 times per sequence: with 64 (the old default) nothing self-modified on nlcl's
    intent (32 tokens) or Bin0 formal-language (<= 50 tokens) sequences. 8 gives 3 writes at T=32.
  * Signed transition eigenvalues (`eigenvalues="signed"`). Along k the W2 transition has
    eigenvalue alpha - erase; every other direction alpha. State tracking such as parity needs
    values down to -1 (Grazzi et al. 2024), which eta' = eta/(1+eta) < 1 of DGD's closed form
    (Eq. 57) never reaches. So the erase strength gets its own self-modifying generator and the
    range (0, 1 + alpha): the eigenvalue lies in (-1, alpha]. Inside a chunk this is the whole
    per-token transition (the inner gradients are taken at the chunk-start state, so the l2
    gradient's own erasure does not act token by token); an earlier range that also subtracted
    eta(k) capped the in-chunk eigenvalue at -(1 - eta(k)), about -0.67 at the default eta.
    erase_init = 0.5 puts the eigenvalue near 0.5 at initialisation. Measured (one-layer probe on
    parity, 320 steps, all memories static): erase_init 0.2 (eigenvalue ~0.8) never left the
    positive range and scored 15.5% of Bin0 strings; 0.5 scored 100%.
    `eigenvalues="positive"` keeps DGD's coupling, erase = alpha eta(k), eigenvalue alpha (1 - eta(k))
    in (0, alpha). `update_rule="gd"` has no erase at all (eigenvalue alpha).
  * Step size at init. eta is shared by every memory, and the k/v/eta/alpha/erase generators are
    rewritten with it at every chunk boundary, so a large initial eta moves the gates a token type
    has learned (e.g. erase ~2 on a parity '1') after every chunk. Measured on the same probe with
    the default chunks (8/16), all memories self-modifying: eta_init 0.5 scored 15-17% of parity's
    Bin0 strings, eta_init 0.1 (W2's step 0.09) 98-99.5%, and 100% on (aa)*. eta_max = 4 still lets
    training raise the step to 0.8 where it pays.
  * Bounded writes. (1) Step normalised by each matrix's own input (Eq. 57 for ||x|| != 1): a
    matrix with input x steps eta/(1 + eta ||x||^2) (W2: x = k, unit norm; W1: its hidden input
    h = s(W2 k), which is not normalised; b: x = 1), so one token's effective step along x,
    eta ||x||^2 / (1 + eta ||x||^2), is below 1 for any eta. Unnormalised, eta |h|^2 grew
    0.3 -> 3.8 -> 295 over three chunks and training went to NaN. (2) That alone is not enough:
    inside a chunk all C gradients are taken at the chunk-start state, so C correlated tokens add
    up to C times the step, and the self-generated target M(v) moves with the state; on random
    input at chunk 16 the states overflowed within 100 tokens for eta >= 0.5. So each token's
    inner-gradient vectors (e, then g) are clipped to RMS <= `inner_grad_clip` (default 1). With
    the transitions non-expansive (|alpha - erase| <= 1, alpha <= 1), every write then has a bounded
    norm and a state can grow at most linearly in the sequence length, never exponentially.
    `inner_grad_clip=None` turns the clip off (the float64 tests run both). (3) What is not
    bounded: the outer gradient at the very largest gates (eta = eta_max, erase at the top of its
    range, no retention). Measured in float32, d=32, chunk 16: the gradient of proj_k reached 1e5
    over the first 128 tokens and 1e20 over 512 on one random sequence, while other draws of 2,048
    tokens stayed near 0.01. The loop runs through the key: the k memory writes with k as its key,
    its output is l2-normalised (whose derivative grows as the raw output shrinks), and the next
    chunk's k comes from the written memory. Cutting the outer gradient through the inner
    gradient's dependence on the state did not remove it. It is the dynamics, not rounding or one
    term: float64 explodes alike (7e6 at 512 tokens); so do positive eigenvalues and plain GD at
    eta = eta_max, static k and v (100 at 512), a looser l2norm, and erase at its top with eta_max
    0.12 at chunk 16; the same draws stay small only with both gates moderate. (4) The bound by
    construction is `backward_window` (tokens): at the first chunk boundary at or after every
    multiple of it the fast states keep their values but the outer gradient through the writes so far is cut
    (`truncate_backward`; the initial states still get their gradient from every window), so the
    gradient can compound over one window only, never over the sequence. Measured at the largest
    gates (float32, d=32, 3 draws, largest |grad|, default chunks 8/16): full backward 0.4-1e8 at
    1,024 tokens; window 32: 0.46-3.1 at 1,024 and 0.12-0.76 at 4,096 tokens; window 64: up to 1.2e3;
    window 16 (chunk 1): below 3 at 1,024 and 4,096 on one machine, but 0.3-27
    over 10 draws of 512 tokens on another CPU (float32 rounding: float64 gave 0.4-3.6); window 8 (chunk 1)
    0.04-0.11. Default 64 tokens, because training does reach
    those gates: on Tiny Shakespeare bytes (T = 128, lr 3e-3, 256 steps) the full backward diverged
    (non-finite gradient) on seeds 1 and 2 at steps 146 and 40, with a layer at eta = eta_max and
    erase at its top, and on MAD in-context recall (seed 0) at step 167; with a window of 64 both LM
    seeds trained to the end (32 did too). A sequence of at most 64 tokens is not cut at all, so
    nlcl's intent streams and formal-language training strings keep the exact full gradient.
    Parity, 640 steps, seed 0, window 32: 100.0 / 38.5 Bin0 / Bin1, full 99.5 / 60.5 (at length
    <= 50 a window of 64 changes nothing). `backward_window=null` is the full backward.
  * Inner gradient. `l2`: grad of 1/2 ||M(k) - v_hat||^2; `dot`: grad of -<M(k), v_hat> (Eq. 92
    with its sign corrected). v_hat is a constant target *inside* the inner gradient (Eq. 93), but
    nothing is detached for the outer gradient: it flows through v_hat, through every write, into
    the generators of k, v, eta, alpha, erase and every initial state.
  * DGD on an MLP. The erase factor acts on W2 (the matrix whose input is k); W1 gets plain
    retention alpha plus its gradient; the bias b of the scalar memories gets its gradient only,
    no retention (retention would pull b, which holds the gate's default, towards 0).
  * Momentum (Table 6's "w/o momentum" switch; Eq. 88 itself has none). With `momentum=True`
    each matrix keeps Titans' surprise momentum S_t = beta_t S_{t-1} - eta_t grad_t (Titans §3.1),
    with a data-dependent gate beta_t = sigmoid(u_k,t . w_beta + b_beta) per token and head, reset
    to 0 for every sequence. `momentum=False` ("w/o momentum") is Eq. 88 exactly. The gate is a
    static projection as in Titans, not a self-modifying memory. Default off: nlcl's Hope is Eq. 88.
  * eta, alpha and erase memories read the key path's input u_k (no extra projections).
  * `compile` (off by default). On the CPU the layer's cost is the number of small operators per
    chunk, not arithmetic (docs/speed.md). With `compile=True` every full-length chunk step of both
    phases (reads, gates, inner gradients, writes) runs through `torch.compile`, which fuses those
    operators into a few generated loops, forward and backward; same formula, so the values agree
    with eager to float32 rounding (tested). Compiling costs about a minute or two per distinct
    shape on this CPU (once per process, less with Inductor's on-disk cache), so it pays on runs of
    many steps, not on short ones. Only training forwards (grad enabled) use it: evaluation and the
    ragged last chunk of a sequence stay eager, so they cost no extra compilation. Where compiling
    fails (no C++ compiler, an unsupported backend), the layer warns once and runs eager.

Stability is tested in float32 at the largest eta and erase the parametrisation allows, chunks 1
and 16, on long random sequences: outputs finite and bounded always, gradients with a backward window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlcl.models.memory import causal_depthwise_conv, chunk_step


@dataclass
class SelfModifyingTitansConfig:
    d_model: int = 128
    n_heads: int = 4
    head_dim: Optional[int] = None  # default d_model // n_heads
    memory_hidden: Optional[int] = None  # hidden width of every memory MLP; default head_dim
    activation: str = "silu"  # silu | gelu: the memories' s(.)
    chunk_size_memory: int = 16  # main memory (the paper's Hope figure)
    chunk_size_other: int = 8  # k, v, q, eta, alpha, erase memories; see "Chunk sizes" above
    inner_objective: str = "l2"  # l2 | dot
    update_rule: str = "dgd"  # dgd | gd (gd drops the erase factor)
    eigenvalues: str = "signed"  # signed: erase in (0, 1 + alpha) | positive: erase = alpha eta(k)
    retention: bool = True  # off: alpha = 1 exactly (the alpha memory's parameters are kept, unused)
    momentum: bool = False  # Titans' data-dependent momentum on the inner gradient (Table 6 switch)
    momentum_init: float = 0.5  # beta at initialisation (through the gate's bias)
    adaptive_k: bool = True  # off: k is the static projection (moved to the slowest level)
    adaptive_v: bool = True
    adaptive_q: bool = False  # §8.1: q is "the only non-adaptive projection"
    conv_size: int = 4
    eta_max: float = 4.0  # eta = eta_max * sigmoid(.); each matrix then steps eta/(1 + eta |x|^2)
    eta_init: float = 0.1  # eta at initialisation (through the eta memory's bias); see "Step size at init"
    erase_init: float = 0.5  # erase at init (signed only): eigenvalue along k alpha - 0.5 ~0.49
    inner_grad_clip: Optional[float] = 1.0  # per-token RMS bound of the inner gradient vectors; None: off
    backward_window: Optional[int] = 64  # tokens; outer gradient truncated across windows ("Bounded writes"); null: full
    alpha_init: float = 0.99  # alpha at initialisation (through the alpha memory's bias)
    norm_eps: float = 1e-6
    compile: bool = False  # torch.compile the chunk steps of training forwards; see "compile" above

    def __post_init__(self):
        for name in ("d_model", "n_heads", "conv_size", "chunk_size_memory", "chunk_size_other"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.memory.{name} must be an integer >= 1, got {value!r}")
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
            ("eigenvalues", self.eigenvalues, ("signed", "positive")),
        ]:
            if value not in allowed:
                raise ValueError(f"model.memory.{name} must be one of {allowed}, got {value!r}")
        for name in ("retention", "momentum", "adaptive_k", "adaptive_v", "adaptive_q", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.memory.{name} must be true or false, got {getattr(self, name)!r}")
        if not (math.isfinite(self.eta_max) and 0.0 < self.eta_init < self.eta_max):
            raise ValueError(f"model.memory: need 0 < eta_init < eta_max < inf, got eta_init={self.eta_init}, "
                             f"eta_max={self.eta_max}")
        if self.inner_grad_clip is not None and not (math.isfinite(self.inner_grad_clip) and self.inner_grad_clip > 0):
            raise ValueError(f"model.memory.inner_grad_clip must be > 0 and finite (or null), got {self.inner_grad_clip}")
        bw = self.backward_window
        if bw is not None and (isinstance(bw, bool) or not isinstance(bw, int) or bw < 1):
            raise ValueError(f"model.memory.backward_window must be an integer >= 1 (or null), got {bw!r}")
        if not 0.0 < self.alpha_init < 1.0:
            raise ValueError(f"model.memory.alpha_init must be in (0, 1), got {self.alpha_init}")
        if not 0.0 < self.momentum_init < 1.0:
            raise ValueError(f"model.memory.momentum_init must be in (0, 1), got {self.momentum_init}")
        if not 0.0 < self.erase_init < self.erase_room_at_init:
            raise ValueError(f"model.memory.erase_init must be in (0, {self.erase_room_at_init:.4g}) (the signed range "
                             f"1 + alpha at alpha_init), got {self.erase_init}")

    @property
    def erase_room_at_init(self) -> float:
        """Upper end of the signed erase range at initialisation (see `erase_strength`)."""
        return 1.0 + (self.alpha_init if self.retention else 1.0)

    @property
    def separate_erase(self) -> bool:
        """Whether the erase strength has its own generator (signed eigenvalues under DGD)."""
        return self.update_rule == "dgd" and self.eigenvalues == "signed"


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
    The layer takes this eta' as every matrix's step (`normalised_step`, with ||x|| kept in);
    its erase strength is separate (see "Signed transition eigenvalues" above)."""
    eta_p = eta / (1 + eta)
    return W - eta_p * torch.outer(W @ x, x) + eta_p * torch.outer(u, x)


class ChunkDecay(NamedTuple):
    """Retention and momentum coefficients of one chunk, shared by every matrix written with the
    same alpha_t and beta_t (see `fast_matrix_chunk` for the formula they enter). "prev" rows belong
    to the state before token t's write (row t holds what row t-1 of the inclusive matrix holds)."""

    gamma_prev: Tensor  # [N, C] gamma_{t-1} = prod_{j<t} alpha_j
    G_prev: Tensor  # [N, C, C] gamma_{t-1} / gamma_j for j < t, else 0
    D_prev: Tensor  # [N, C, C] G_prev @ Bm (momentum-weighted; = G_prev without momentum)
    d0_prev: Optional[Tensor]  # [N, C] G_prev @ b0: weight of the chunk-start momentum
    gamma_last: Tensor  # [N] gamma_C
    D_last: Tensor  # [N, C] last row of the inclusive D
    G_last: Tensor  # [N, C]
    d0_last: Optional[Tensor]  # [N]
    beta_total: Optional[Tensor]  # [N] prod_{j<=C} beta_j: what is left of S0 at the chunk's end
    beta_to_end: Optional[Tensor]  # [N, C] prod_{j>l} beta_j: what is left of token l's gradient


def shift_down(t: Tensor, dim: int) -> Tensor:
    """Row t <- row t-1 and row 0 <- 0 along `dim`."""
    t = t.movedim(dim, -1)
    return F.pad(t[..., :-1], (1, 0)).movedim(-1, dim)


def _cumulative_ratios(log_a: Tensor) -> Tensor:
    """[N, C] log gates -> [N, C, C] prod_{j<m<=t} a_m for j <= t (1 on the diagonal), else 0."""
    C = log_a.shape[1]
    idx = torch.arange(C, device=log_a.device)
    incl = idx[:, None] >= idx[None, :]
    cum = log_a.cumsum(-1)
    return torch.exp((cum[:, :, None] - cum[:, None, :]).masked_fill(~incl, float("-inf")))


def chunk_decay(log_alpha: Tensor, log_beta: Optional[Tensor] = None) -> ChunkDecay:
    """Coefficients for W_t = alpha_t W_{t-1} + S_t - ..., S_t = beta_t S_{t-1} + ..., within a chunk.
    `log_beta` None: no momentum (S_t is the step alone)."""
    log_gamma = log_alpha.cumsum(-1)
    G = _cumulative_ratios(log_alpha)  # gamma_t / gamma_j for j <= t
    D, d0, beta_total, beta_to_end = G, None, None, None
    if log_beta is not None:
        Bm = _cumulative_ratios(log_beta)  # prod_{l<m<=j} beta_m, l <= j
        b0 = torch.exp(log_beta.cumsum(-1))  # prod_{m<=j} beta_m: weight of S0 in S_j
        D = G @ Bm
        d0 = (G @ b0[..., None])[..., 0]
        beta_total, beta_to_end = b0[:, -1], Bm[:, -1]
    return ChunkDecay(
        gamma_prev=torch.exp(shift_down(log_gamma, 1)),
        G_prev=shift_down(G, 1),
        D_prev=shift_down(D, 1),
        d0_prev=None if d0 is None else shift_down(d0, 1),
        gamma_last=torch.exp(log_gamma[:, -1]),
        D_last=D[:, -1],
        G_last=G[:, -1],
        d0_last=None if d0 is None else d0[:, -1],
        beta_total=beta_total,
        beta_to_end=beta_to_end,
    )


def fast_matrix_chunk(
    W0: Tensor,  # [N, dout, din] state at chunk start
    S0: Optional[Tensor],  # [N, dout, din] momentum at chunk start (None without momentum)
    x: Tensor,  # [N, C, din] inputs of the matrix (keys)
    u: Tensor,  # [N, C, dout] output-side gradient vectors, from the chunk-start state
    eta: Tensor,  # [N, C] learning rate
    decay: ChunkDecay,  # from chunk_decay(log alpha, log beta)
    erase: Optional[Tensor] = None,  # [N, C] DGD erasure strength; None: plain GD
    queries: Optional[Tensor] = None,  # [N, C, din]: also return W_{t-1} y_t for each t
    x_w0: Optional[Tensor] = None,  # [N, C, dout] x @ W0^T when the caller has it already
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """One chunk of   W_t = W_{t-1} (alpha_t I - erase_t x_t x_t^T) + S_t,
                      S_t = beta_t S_{t-1} - eta_t u_t x_t^T,
    solved in parallel: a gated delta rule whose writes are rank-1 gradients, WY/UT-style.

    Unrolled with gamma_t = prod_{j<=t} alpha_j, every state in the chunk is
        W_t = gamma_t W0 + d0_t S0 - sum_{j<=t} G[t,j] erase_j r_j x_j^T - sum_{l<=t} D[t,l] eta_l u_l x_l^T
    with G[t,j] = gamma_t / gamma_j, D = G @ Bm, Bm[j,l] = prod_{l<m<=j} beta_m, d0 = G @ prod beta,
    and r_j = W_{j-1} x_j, what the state currently maps x_j to (what DGD erases). Reading that
    formula at y = x_i gives a unit lower-triangular system for all r_i at once.
    Returns (W_C, S_C, W_{t-1} y_t for every t)."""
    C = x.shape[1]
    u_eta = u * eta[..., None]

    def read(y: Tensor, r: Optional[Tensor], yx: Optional[Tensor] = None, y_w0: Optional[Tensor] = None) -> Tensor:
        """W_{t-1} y_t for every t of the chunk: a causally masked matrix product."""
        yx = y @ x.transpose(1, 2) if yx is None else yx  # [N, C, C]
        y_w0 = y @ W0.transpose(1, 2) if y_w0 is None else y_w0
        out = decay.gamma_prev[..., None] * y_w0 - (decay.D_prev * yx) @ u_eta
        if S0 is not None:
            out = out + decay.d0_prev[..., None] * (y @ S0.transpose(1, 2))
        if r is not None:
            out = out - (decay.G_prev * yx) @ (r * erase[..., None])
        return out

    r = None
    if erase is not None:
        xx = x @ x.transpose(1, 2)  # the Gram matrix: in the right-hand side and in the system
        rhs = read(x, None, xx, x_w0)  # everything but the erasures themselves
        lower = decay.G_prev * xx * erase[:, None, :]
        eye = torch.eye(C, dtype=x.dtype, device=x.device)
        r = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)

    # state after the chunk: the last row of the unrolled formula
    writes = u_eta * decay.D_last[..., None]  # [N, C, dout]: what each token adds along its x
    if r is not None:  # and what it erases: both are rank-1 along x_t, so one product takes both
        writes = writes + r * (decay.G_last * erase)[..., None]
    W = decay.gamma_last[:, None, None] * W0 - writes.transpose(1, 2) @ x
    S = None
    if S0 is not None:
        W = W + decay.d0_last[:, None, None] * S0
        S = decay.beta_total[:, None, None] * S0 - (u_eta * decay.beta_to_end[..., None]).transpose(1, 2) @ x

    reads = read(queries, r) if queries is not None else None
    return W, S, reads


def normalised_step(eta: Tensor, x: Tensor) -> Tensor:
    """eta/(1 + eta ||x||^2): DGD's step (Eq. 57) for an input x that need not be unit-norm."""
    return eta / (1 + eta * x.pow(2).sum(-1))


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


def cuts_after(chunk_end: int, chunk: int, window: Optional[int]) -> bool:
    """Whether the outer gradient is cut after the chunk that ends at token `chunk_end`: at the first
    chunk boundary at or after every multiple of `window` (so any chunk size works with any window)."""
    return bool(window) and chunk_end // window > (chunk_end - chunk) // window


def truncate_backward(state: tuple, start: tuple) -> tuple:
    """The same state values, with the outer gradient through the writes so far cut: each tensor
    becomes start + (state - start).detach(). The initial states (`start`, views of parameters) keep
    their gradient from every window, as if the accumulated writes were a constant offset; the
    tangent dynamics through earlier windows are dropped. Works on any NamedTuple of fast weights."""
    return type(state)(*(s if s is None else s0 + (s - s0).detach() for s, s0 in zip(state, start)))


def memory_forward(state: MemoryState, x: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """M(x) for x [N, C, din]; also returns the hidden pre-activation z and activation h."""
    z = x @ state.w2.transpose(1, 2)
    h, _ = activation_and_derivative(z, activation)
    out = h @ state.w1.transpose(1, 2)
    out = out + state.b if state.b is not None else out + x
    return out, z, h


def clip_rows(u: Tensor, max_rms: Optional[float]) -> Tensor:
    """Scale each row u_t down to RMS <= max_rms (||u_t|| <= max_rms sqrt(dim)); None: unchanged."""
    if max_rms is None:
        return u
    limit = max_rms * math.sqrt(u.shape[-1])
    return u * (limit / (u.norm(dim=-1, keepdim=True) + 1e-12)).clamp(max=1.0)


def inner_gradients(state: MemoryState, keys: Tensor, values: Tensor, objective: str, activation: str,
                    max_rms: Optional[float] = None):
    """Rank-1 factors of the inner gradient at this (chunk-start) state, for every token:
    grad W1 = e h^T, grad W2 = g k^T, grad b = e, with e = dLoss/dM(k) and v_hat = M(v) held constant.
    With `max_rms`, e and then g are clipped per token (see "Bounded writes" in the module notes)."""
    e, g, h, _ = _inner_gradients(state, keys, values, objective, activation, max_rms)
    return e, g, h


def _inner_gradients(state: MemoryState, keys: Tensor, values: Tensor, objective: str, activation: str,
                     max_rms: Optional[float]):
    """`inner_gradients`, plus z = keys W2^T (fast_matrix_chunk needs it too). Keys and values go
    through the memory as one batch of 2C rows."""
    C = keys.shape[1]
    out, z, h = memory_forward(state, torch.cat([keys, values], dim=1), activation)
    (pred, v_hat), (z, _), (h, _) = out.split(C, dim=1), z.split(C, dim=1), h.split(C, dim=1)
    e = clip_rows(pred - v_hat if objective == "l2" else -v_hat, max_rms)
    _, ds = activation_and_derivative(z, activation)
    g = clip_rows((e @ state.w1) * ds, max_rms)
    return e, g, h, z


def memory_chunk_step(
    state: MemoryState,
    keys: Tensor,  # [N, C, dh] unit-norm
    values: Tensor,  # [N, C, dh]
    eta: Tensor,  # [N, C] generated step size, before each matrix's input normalisation
    erase: Optional[Tensor],  # [N, C] erase strength along k for W2; None: plain GD
    decay: ChunkDecay,  # retention alpha (and momentum) of this chunk
    cfg: SelfModifyingTitansConfig,
    bias_decay: Optional[ChunkDecay] = None,  # alpha = 1: for the scalar memories' bias
    queries: Optional[Tensor] = None,  # [N, C, dh]: read M_{t-1}(q_t) with the running state
) -> tuple[MemoryState, Optional[Tensor]]:
    """All writes of one chunk (Eq. 88 with chunk-start gradients) and, optionally, the reads."""
    e, g, h, z = _inner_gradients(state, keys, values, cfg.inner_objective, cfg.activation, cfg.inner_grad_clip)
    # W2: the erase factor (alpha I - erase k k^T) acts here, since W2's input is k
    w2, s2, z_q = fast_matrix_chunk(state.w2, state.s2, keys, g, normalised_step(eta, keys), decay, erase, queries,
                                    x_w0=z)
    h_q = activation_and_derivative(z_q, cfg.activation)[0] if queries is not None else None
    # W1: plain retention alpha plus its gradient; its input is the chunk-start hidden h, whose
    # norm is not fixed, so its step is normalised by ||h||^2 (Eq. 57)
    w1, s1, read = fast_matrix_chunk(state.w1, state.s1, h, e, normalised_step(eta, h), decay, None, h_q)
    b, sb = None, None
    if state.b is not None:  # bias: its gradient only, no retention; its input is the constant 1
        b, sb, _ = fast_matrix_chunk(state.b, state.sb, torch.ones_like(e), e, eta / (1 + eta), bias_decay)
    out = queries + read if queries is not None else None  # the main memory is residual
    return MemoryState(w1, w2, b, s1, s2, sb), out


def erase_strength(cfg: SelfModifyingTitansConfig, eta: Tensor, alpha: Tensor, raw: Optional[Tensor]) -> Optional[Tensor]:
    """Erase strength along k for W2 (None under plain GD), from the generated eta, alpha and (signed)
    the erase memory's raw read [..., 1]: signed erase = (1 + alpha) sigmoid(raw), so the in-chunk
    eigenvalue alpha - erase lies in (-1, alpha); positive erase = alpha eta(k), DGD's coupling."""
    if cfg.update_rule != "dgd":
        return None
    if cfg.eigenvalues == "positive":  # DGD's own coupling: alpha (I - eta(k) k k^T)
        return alpha * eta / (1 + eta)  # W2's step, ||k|| = 1
    return (1 + alpha) * torch.sigmoid(raw[..., 0])


def transition_eigenvalue(alpha: Tensor, erase: Optional[Tensor]) -> Tensor:
    """Eigenvalue along k of one token's in-chunk transition of W2, alpha - erase (alpha under plain
    GD): exactly what the chunk recurrence multiplies the state by (its gradients are fixed at the
    chunk start)."""
    return alpha if erase is None else alpha - erase


# ----------------------------------------------------------------------------------------------
# The layer


class Generated(NamedTuple):
    """Per-token quantities from the generation phase, flattened to N = B*H sequences: [N, T, ...]."""

    q: Tensor
    k: Tensor
    v: Tensor
    eta: Tensor  # [N, T] generated step size (each matrix normalises it by its own input)
    erase: Optional[Tensor]  # [N, T] erase strength along k (None under plain GD)
    log_alpha: Tensor  # [N, T] retention
    log_beta: Optional[Tensor]  # [N, T] momentum gate (None without momentum)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def generation_chunk(layer: "SelfModifyingTitans", state, layout, uq: Tensor, uk: Tensor, uv: Tensor,
                     log_beta: Optional[Tensor], write: bool):
    """One chunk of phase 1: reads from the chunk-start state (Eqs. 83-85), the generated q, k, v and
    gates, then (if `write`) every memory's writes, each regressing M(k) onto its own M(v)."""
    from nlcl.models.stacked_memories import stacked_chunk_step, stacked_read  # imports this module's math

    raw = stacked_read(state, layout, {"q": uq, "k": uk, "v": uv}, layer.cfg.activation)
    generated = layer.generated(raw, uq, uk, uv)  # q, k, v, eta, erase, log alpha
    if write:
        _, k, v, eta, erase, log_alpha = generated
        state = stacked_chunk_step(state, layout, k, v, eta, erase, log_alpha, log_beta, layer.cfg)
    return generated, state


def main_memory_chunk(cfg: SelfModifyingTitansConfig, state: MemoryState, q, k, v, eta, erase, log_alpha, log_beta):
    """One chunk of phase 2: the main memory's reads o_t = M_{t-1}(q_t) and its writes."""
    state, o = memory_chunk_step(state, k, v, eta, erase, chunk_decay(log_alpha, log_beta), cfg, queries=q)
    return state, o


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
        # in-context memories (initial states); the scalar ones' biases set the initial gates
        mem = {"memory": InContextMemory(H, dh, m, residual=True)}
        for name, on in [("k", cfg.adaptive_k), ("v", cfg.adaptive_v), ("q", cfg.adaptive_q)]:
            if on:
                mem[name] = InContextMemory(H, dh, m, residual=True)
        mem["eta"] = InContextMemory(H, dh, m, residual=False, bias_init=_logit(cfg.eta_init / cfg.eta_max))
        mem["alpha"] = InContextMemory(H, dh, m, residual=False, bias_init=_logit(cfg.alpha_init))
        if cfg.separate_erase:
            mem["erase"] = InContextMemory(H, dh, m, residual=False,
                                           bias_init=_logit(cfg.erase_init / cfg.erase_room_at_init))
        self.memories = nn.ModuleDict(mem)
        if cfg.momentum:  # Titans' momentum gate: a static projection of the key path, per head
            self.momentum_gate = nn.Parameter(torch.zeros(H, dh))
            self.momentum_bias = nn.Parameter(torch.full((H,), _logit(cfg.momentum_init)))
        # output: per-head RMSNorm, SiLU gate, projection
        self.out_norm = nn.Parameter(torch.ones(dh))
        self.proj_gate = nn.Linear(d, inner, bias=False)
        self.proj_out = nn.Linear(inner, d, bias=False)
        self.reset_mechanism_stats()

    # --- pieces shared with reference_forward ----------------------------------------------------

    def memory_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u_q, u_k, u_v as [N, T, dh] (N = B*H): projection, causal conv, SiLU."""
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim

        def path(proj, conv):
            u = F.silu(causal_depthwise_conv(proj(x), conv))
            return u.view(B, T, H, dh).transpose(1, 2).reshape(B * H, T, dh)

        return path(self.proj_q, self.conv_q), path(self.proj_k, self.conv_k), path(self.proj_v, self.conv_v)

    def momentum_log_gate(self, u_k: Tensor) -> Optional[Tensor]:
        """log beta_t [N, T] from the key path (None without momentum)."""
        if not self.cfg.momentum:
            return None
        H = self.cfg.n_heads
        B = u_k.shape[0] // H
        w = self.momentum_gate.repeat(B, 1)[:, None, :]  # [N, 1, dh], row n belongs to head n % H
        b = self.momentum_bias.repeat(B)[:, None]
        return F.logsigmoid((u_k * w).sum(-1) + b)

    def other_memory_groups(self) -> list[list[str]]:
        """Memories updated at chunk_size_other, in groups of equal shape that run as one batch:
        the residual k/v/q memories and the scalar eta/alpha/erase ones (alpha idle without retention)."""
        residual = [n for n in ("k", "v", "q") if n in self.memories]
        scalar = ["eta"] + (["alpha"] if self.cfg.retention else []) + (["erase"] if "erase" in self.memories else [])
        return [g for g in (residual, scalar) if g]

    def gates(self, raw: dict[str, Tensor]) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """eta, erase and log alpha [N, C] from the scalar memories' raw reads."""
        cfg = self.cfg
        eta = cfg.eta_max * torch.sigmoid(raw["eta"][..., 0])
        # without retention alpha is exactly 1
        log_alpha = F.logsigmoid(raw["alpha"][..., 0]) if cfg.retention else torch.zeros_like(eta)
        return eta, erase_strength(cfg, eta, log_alpha.exp(), raw.get("erase")), log_alpha

    def generated(self, raw: dict[str, Tensor], u_q, u_k, u_v):
        """q, k, v, eta, erase, log alpha from the memories' raw reads (or the static inputs when a
        projection is not adaptive)."""
        cfg, eps = self.cfg, self.cfg.norm_eps
        k = F.normalize(raw["k"] if cfg.adaptive_k else u_k, dim=-1, eps=eps)
        v = raw["v"] if cfg.adaptive_v else u_v
        q = F.normalize(raw["q"] if cfg.adaptive_q else u_q, dim=-1, eps=eps)
        return (q, k, v, *self.gates(raw))

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """o [N, T, dh] -> per-head RMSNorm, SiLU(x W_g) gate, output projection -> [B, T, d]."""
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps) * self.out_norm
        o = o.view(B, H, T, dh).transpose(1, 2).reshape(B, T, H * dh)
        return self.proj_out(o * F.silu(self.proj_gate(x)))

    # --- chunk-parallel forward ---------------------------------------------------------------------

    def generate(self, x: Tensor) -> Generated:
        """Phase 1: run the k/v/q/eta/alpha/erase memories over chunks of chunk_size_other, all of
        them as one stacked state (`nlcl.models.stacked_memories`: one W2 matrix whose row blocks are
        the memories, since they share k, v and the gates)."""
        from nlcl.models.stacked_memories import initial_stacked_state, stacked_layout  # imports this module's math

        cfg = self.cfg
        B, T, _ = x.shape
        C = cfg.chunk_size_other
        # compiled: projection, shifted-product convolution and SiLU of the three paths fuse
        u_q, u_k, u_v = chunk_step(SelfModifyingTitans.memory_inputs, cfg.compile)(self, x)
        log_beta = self.momentum_log_gate(u_k)
        layout = stacked_layout(self.other_memory_groups(), cfg.memory_hidden)
        state = start = initial_stacked_state(self.memories, layout, B, cfg.momentum)
        # split once: slicing inside the loop would make autograd scatter every chunk's gradient
        # into a full-length zero tensor (and add those up)
        n_chunks = -(-T // C)  # the last chunk may be shorter
        split = lambda t: [None] * n_chunks if t is None else t.split(C, dim=1)  # noqa: E731
        pieces = []
        for i, (uq, uk, uv, lb) in enumerate(zip(split(u_q), split(u_k), split(u_v), split(log_beta))):
            last = i == n_chunks - 1  # the last chunk's writes would never be read: no write
            step = chunk_step(generation_chunk, cfg.compile and not last and uq.shape[1] == C)
            generated, state = step(self, state, layout, uq, uk, uv, lb, not last)
            pieces.append((*generated, lb))
            if not last and cuts_after((i + 1) * C, C, cfg.backward_window):
                state = truncate_backward(state, start)
        gen = Generated(*(None if p[0] is None else torch.cat(p, dim=1) for p in zip(*pieces)))
        if self.training:
            self._record_mechanism_stats(gen, B, T)
        return gen

    def main_memory(self, gen: Generated, batch: int) -> Tensor:
        """Phase 2: the main memory over chunks of chunk_size_memory; returns o_t = M_{t-1}(q_t)."""
        cfg = self.cfg
        C = cfg.chunk_size_memory
        state = start = self.memories["memory"].initial_state(batch, cfg.momentum)
        n_chunks = -(-gen.k.shape[1] // C)
        fields = [[None] * n_chunks if t is None else t.split(C, dim=1) for t in gen]  # split once, as in generate
        outs = []
        for i, chunk in enumerate(zip(*fields)):
            step = chunk_step(main_memory_chunk, cfg.compile and chunk[0].shape[1] == C)
            state, o = step(cfg, state, *chunk)
            outs.append(o)
            if cuts_after((i + 1) * C, C, cfg.backward_window):
                state = truncate_backward(state, start)
        return torch.cat(outs, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.main_memory(self.generate(x), x.shape[0]), x)

    # --- mechanism telemetry (training forwards only; device-side sums, read at log points) ------

    def writes_per_sequence(self, T: int) -> dict[str, int]:
        """How often each memory's writes are read later in a sequence of T tokens: chunk steps for
        the k/v/q/eta/alpha/erase memories (the last chunk's writes are never read); token writes for
        the main memory, whose reads use the running state (its gradient point moves every
        chunk_size_memory tokens: `memory_refresh`)."""
        cfg = self.cfg
        other = max(math.ceil(T / cfg.chunk_size_other) - 1, 0)
        out = {n: other for g in self.other_memory_groups() for n in g}
        out["memory"] = max(T - 1, 0)
        out["memory_refresh"] = max(math.ceil(T / cfg.chunk_size_memory) - 1, 0)
        return out

    def backward_cuts_per_sequence(self, T: int) -> dict[str, int]:
        """How often `backward_window` cuts the outer gradient in a sequence of T tokens, per phase
        (a cut after the last chunk cuts nothing, so it is not counted): 0 says the window is inert."""
        cfg, out = self.cfg, {}
        for phase, C in (("generation", cfg.chunk_size_other), ("memory", cfg.chunk_size_memory)):
            n_chunks = -(-T // C)
            out[phase] = sum(cuts_after((i + 1) * C, C, cfg.backward_window) for i in range(n_chunks - 1))
        return out

    def reset_mechanism_stats(self) -> None:
        self._stats: dict[str, Tensor] = {}
        self._stat_sequences = 0
        self._stat_writes: dict[str, int] = {}

    @torch.no_grad()
    def _record_mechanism_stats(self, gen: Generated, batch: int, T: int) -> None:
        alpha = gen.log_alpha.exp()
        eigen = transition_eigenvalue(alpha, gen.erase)
        values = {"eta": gen.eta, "alpha": alpha, "eigenvalue": eigen}
        if gen.erase is not None:
            values["erase"] = gen.erase
        if gen.log_beta is not None:
            values["momentum"] = gen.log_beta.exp()
        new = {"tokens": torch.tensor(float(gen.eta.numel()), device=gen.eta.device),
               "negative_eigenvalues": (eigen < 0).sum().to(gen.eta.dtype)}
        for name, t in values.items():
            new[f"{name}_sum"] = t.sum()
            new[f"{name}_min"] = t.min()
            new[f"{name}_max"] = t.max()
        for key, value in new.items():
            old = self._stats.get(key)
            if old is None:
                self._stats[key] = value.detach().float()
            elif key.endswith("_min"):
                self._stats[key] = torch.minimum(old, value.float())
            elif key.endswith("_max"):
                self._stats[key] = torch.maximum(old, value.float())
            else:
                self._stats[key] = old + value.float()
        self._stat_sequences += batch
        counts = {f"writes_per_sequence/{k}": v for k, v in self.writes_per_sequence(T).items()}
        counts.update({f"backward_cuts_per_sequence/{k}": v for k, v in self.backward_cuts_per_sequence(T).items()})
        for name, n in counts.items():
            self._stat_writes[name] = self._stat_writes.get(name, 0) + n * batch

    def mechanism_stats(self) -> dict[str, float]:
        """Summary since the last reset (host sync here, at log points only): writes per sequence for
        each memory, backward-window cuts per sequence per phase, mean/min/max of eta, alpha, erase, the W2 eigenvalue along k (and momentum), and
        the fraction of (token, head) pairs whose eigenvalue is negative."""
        if not self._stats:
            return {}
        s = {k: float(v) for k, v in self._stats.items()}
        n, tokens = self._stat_sequences, s["tokens"]
        out = {k: v / n for k, v in self._stat_writes.items()}
        for name in ("eta", "alpha", "erase", "momentum", "eigenvalue"):
            if f"{name}_sum" in s:
                out[f"{name}_mean"] = s[f"{name}_sum"] / tokens
                out[f"{name}_min"], out[f"{name}_max"] = s[f"{name}_min"], s[f"{name}_max"]
        out["negative_eigenvalue_fraction"] = s["negative_eigenvalues"] / tokens
        return out


# ----------------------------------------------------------------------------------------------
# Sequential reference (tests only): one token at a time, same parameters, same semantics.


_MOMENTUM_OF = {"w1": "s1", "w2": "s2", "b": "sb"}


def _reference_apply(mem: dict, x: Tensor, activation: str) -> Tensor:
    """M(x) for one token x [N, din]: x + W1 s(W2 x), or w1^T s(W2 x) + b for the scalar memories."""
    h, _ = activation_and_derivative(torch.einsum("nhi,ni->nh", mem["w2"], x), activation)
    out = torch.einsum("noh,nh->no", mem["w1"], h)
    return out + mem["b"][:, 0] if mem["b"] is not None else out + x


def _reference_write(running: dict, start: dict, k, v, eta, erase, alpha, beta,
                     cfg: SelfModifyingTitansConfig) -> dict:
    """One token's write (Eq. 88), the gradient taken at the chunk-start state `start`:
    W2 <- W2 (alpha I - erase k k^T) + S2,  W1 <- alpha W1 + S1,  b <- b + Sb,
    S <- beta S - eta/(1 + eta |x|^2) grad, with x each matrix's own input (k, h, 1)."""
    names = ["w1", "w2"] + (["b"] if start["b"] is not None else [])
    # the inner gradient of one token (its formula is checked against autograd in the tests)
    state = MemoryState(start["w1"], start["w2"], start["b"], None, None, None)
    e, g, h = inner_gradients(state, k[:, None], v[:, None], cfg.inner_objective, cfg.activation, cfg.inner_grad_clip)
    e, g, h = e[:, 0], g[:, 0], h[:, 0]
    outer = lambda a, b: torch.einsum("no,ni->noi", a, b)  # noqa: E731
    grads = {"w1": outer(e, h), "w2": outer(g, k), "b": e[..., None]}
    step = {"w1": eta / (1 + eta * (h * h).sum(-1)), "w2": eta / (1 + eta * (k * k).sum(-1)), "b": eta / (1 + eta)}

    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    factor = alpha[:, None, None] * eye  # the factor acting on W2, whose input is k
    if erase is not None:
        factor = factor - erase[:, None, None] * torch.einsum("ni,nj->nij", k, k)
    retain = {"w1": alpha[:, None, None], "b": 1.0}  # W1: plain retention; b: none

    new = {}
    for n in names:
        s = -step[n][:, None, None] * grads[n]
        if beta is not None:
            s = s + beta[:, None, None] * running[_MOMENTUM_OF[n]]
        new[_MOMENTUM_OF[n]] = s
        kept = running[n] @ factor if n == "w2" else retain[n] * running[n]
        new[n] = kept + s
    new.setdefault("b", None)
    new.setdefault("sb", None)
    return new


def reference_forward(layer: SelfModifyingTitans, x: Tensor) -> Tensor:
    """Token-by-token self-modifying Titans, as plainly as possible (tests only).

    At each token: (1) at chunk boundaries, snapshot the states; (2) generate q, k, v, eta, alpha,
    erase from the chunk-start states; (3) read o_t = M_memory(q_t) from the running state; (4) write
    every memory with its gradient at its chunk-start state."""
    cfg = layer.cfg
    B, T, _ = x.shape
    u_q, u_k, u_v = layer.memory_inputs(x)
    log_beta = layer.momentum_log_gate(u_k)

    def fresh(mem: InContextMemory) -> dict:
        state = mem.initial_state(B, momentum=False)  # [B*H, ...] copies of the initial state
        state = {"w1": state.w1, "w2": state.w2, "b": state.b}
        momenta = {_MOMENTUM_OF[n]: None if t is None else torch.zeros_like(t) for n, t in state.items()}
        return state | momenta

    running = {name: fresh(mem) for name, mem in layer.memories.items()}
    initial = dict(running)
    apply = lambda mem, u: _reference_apply(mem, u, cfg.activation)  # noqa: E731
    outputs = []
    for t in range(T):
        # cut the outer gradient (values kept) at the chunk boundaries the chunked form cuts at
        cut = lambda C: t and t % C == 0 and cuts_after(t, C, cfg.backward_window)  # noqa: E731
        for n in running:
            if cut(cfg.chunk_size_memory if n == "memory" else cfg.chunk_size_other):
                running[n] = {f: None if s is None else initial[n][f] + (s - initial[n][f]).detach()
                              for f, s in running[n].items()}
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
        erase_raw = apply(start["erase"], u_k[:, t]) if "erase" in start else None
        erase = erase_strength(cfg, eta, alpha, erase_raw)
        beta = None if log_beta is None else log_beta[:, t].exp()

        outputs.append(apply(running["memory"], q))  # read before this token's write
        for n in sum(layer.other_memory_groups(), []) + ["memory"]:
            running[n] = _reference_write(running[n], start[n], k, v, eta, erase, alpha, beta, cfg)
    return layer.output(torch.stack(outputs, dim=1), x)
