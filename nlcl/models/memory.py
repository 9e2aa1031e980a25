"""Associative memories and their in-context update rules, as pure functions.

Shapes: q, k [B, H, T, dk]; v [B, H, T, dv]; per-token gates (a, b, alpha, eta, lr, ...) [B, H, T].
A linear memory state S [B, H, dv, dk] maps keys to values: read o = S q, write S += v k^T.
The MLP memory is `M(x) = x + W1 s(W2 x)` with W2 [B, H, dh, d] and W1 [B, H, d, dh].

Every rule comes in two forms:
- a chunk-parallel form (the training path): everything inside a chunk is batched matrix algebra,
  only a Python loop over chunks carries the state;
- a sequential `*_reference` form that walks token by token (for tests only).

Read convention (`read_after_write`):
- True (default, linear attention / DeltaNet / Titans' y_t = M_t(q_t)): o_t = M_t(q_t), the state
  after token t has been written;
- False (the paper's self-modifying Titans, y_t = M_{t-1}(q_t)): o_t = M_{t-1}(q_t).

Rules whose write depends on the memory's own prediction through a gradient (GD + momentum,
the MLP memory, DGD with the `l2` objective) take that gradient at the chunk-start state M_0, as
Titans §3.2 and Nested Learning §8.2 do; their references do the same, so chunk size is part of the
rule and chunk_size=1 is exact per-token GD. Inner losses are `1/2 ||M(k) - v||^2` (`l2`) or
`-<M(k), v>` (`dot`).

Gates that act as decays (a, alpha, retention, momentum) must lie in (0, 1]; they are handled in
log space. T need not be a multiple of the chunk size: the tail is padded, and the final state is
read at the last real token, so it is exact.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# the short causal convolution on memory inputs (Titans and self-modifying Titans)


def causal_depthwise_conv(x: Tensor, weight: Tensor) -> Tensor:
    """x [B, T, c], weight [c, 1, width]: each channel sees its last `width` inputs; the same as
    F.conv1d(left-padded x, weight, groups=c), written as `width` shifted products because the CPU's
    depthwise convolution backward took 8-9% of a Hope or Titans training step (tested against conv1d)."""
    width, T = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, width - 1, 0))  # width - 1 zeros before the first token
    taps = weight[:, 0].t()  # [width, c]; tap i multiplies the input width - 1 - i tokens back
    y = padded[:, :T] * taps[0]
    for i in range(1, width):
        y = y + padded[:, i : i + T] * taps[i]
    return y


# ----------------------------------------------------------------------------------------------
# chunking and decay bookkeeping


_COMPILED: dict = {}  # chunk function -> its torch.compile wrapper (one per process, shared by layers)
_COMPILE_FAILED: list = []  # the first failure's message: from then on everything runs eager


def chunk_step(fn, compiled: bool):
    """`fn` itself, or its torch.compile form (fullgraph) when `compiled` and grad is enabled.

    Chunked memories call one function per chunk; on a CPU its cost is the number of small operators,
    which compiling fuses. Only training forwards compile (evaluation runs eager, so it costs no extra
    compilation). A compiler failure (no C++ compiler, an unsupported backend) warns once and every
    later call runs eager: the same formula, so only the speed changes."""
    if not compiled or _COMPILE_FAILED or not torch.is_grad_enabled():
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)

    def run(*args):
        if _COMPILE_FAILED:
            return fn(*args)
        try:
            return _COMPILED[fn](*args)
        except Exception as error:  # a compiler failure, not a numerical one: eager computes the same
            import warnings

            _COMPILE_FAILED.append(f"{type(error).__name__}: {error}")
            warnings.warn(f"model.memory.compile: torch.compile failed ({_COMPILE_FAILED[0][:300]}); "
                          "running the memory chunks eager", RuntimeWarning, stacklevel=2)
            return fn(*args)

    return run


def _to_chunks(x: Tensor, chunk_size: int, fill: float = 0.0) -> Tensor:
    """[B, H, T, ...] -> [B, H, N, C, ...], padding the tail with `fill`."""
    B, H, T = x.shape[:3]
    pad = -T % chunk_size
    if pad:
        x = torch.cat([x, x.new_full((B, H, pad, *x.shape[3:]), fill)], dim=2)
    return x.reshape(B, H, -1, chunk_size, *x.shape[3:])


def _from_chunks(x: Tensor, T: int) -> Tensor:
    """[B, H, N, C, ...] -> [B, H, T, ...], dropping the padded tail."""
    B, H, N, C = x.shape[:4]
    return x.reshape(B, H, N * C, *x.shape[4:])[:, :, :T]


def _segsum(log_a: Tensor) -> Tensor:
    """out[..., i, j] = sum_{j < l <= i} log_a[..., l] on and below the diagonal, -inf above.

    Built by a masked cumsum rather than a difference of cumsums, so exp() of it is a product of
    decays with no cancellation.
    """
    C = log_a.shape[-1]
    strict = torch.ones(C, C, dtype=torch.bool, device=log_a.device).tril(-1)
    x = log_a.unsqueeze(-1).expand(*log_a.shape, C).masked_fill(~strict, 0.0)
    lower = torch.ones(C, C, dtype=torch.bool, device=log_a.device).tril(0)
    return x.cumsum(dim=-2).masked_fill(~lower, float("-inf"))


class _Writes(NamedTuple):
    """How a chunk's start state and its rank-1 writes w_j x_j^T combine, for one weight matrix W.

    State read at position i:  read_state_i W_0 [+ read_momentum_i S_0] + sum_j read_tokens_ij w_j x_j^T
    State at the chunk's end:  end_state W_0 [+ end_momentum S_0] + sum_j end_tokens_j w_j x_j^T
    Momentum at the chunk's end (if any): momentum_state S_0 + sum_j momentum_tokens_j w_j x_j^T
    _retention_writes returns one _Writes per chunk, fields [B, H(, C(, C))].
    """
    read_state: Tensor
    read_tokens: Tensor
    end_state: Tensor
    end_tokens: Tensor
    read_momentum: Tensor | None = None
    end_momentum: Tensor | None = None
    momentum_state: Tensor | None = None
    momentum_tokens: Tensor | None = None


def _retention_writes(lr: Tensor, log_retention: Tensor, log_momentum: Tensor | None,
                      read_after_write: bool, length: int, compile: bool = False) -> list[_Writes]:
    """Coefficients of W_t = r_t W_{t-1} + lr_t w_t x_t^T, or with momentum
    S_t = m_t S_{t-1} + lr_t w_t x_t^T, W_t = r_t W_{t-1} + S_t. Inputs are chunked [B, H, N, C].

    The "end" of the last chunk is the last real token (length - 1): padded tokens are not no-ops
    under momentum (M keeps adding S), so they are cut off instead of neutralised.
    `compile`: the decay tables are built by one compiled function (`chunk_step`).
    """
    N = lr.shape[-2]
    fields = chunk_step(_retention_fields, compile)(lr, log_retention, log_momentum, read_after_write, length)
    # split per chunk once: indexing inside the loop would make autograd scatter into full-size zeros
    return [_Writes(*per_chunk) for per_chunk in zip(*(_unbind(f, N) for f in fields))]


def _retention_fields(lr: Tensor, log_retention: Tensor, log_momentum: Tensor | None,
                      read_after_write: bool, length: int) -> tuple:
    """The _Writes fields of every chunk at once, [B, H, N(, C(, C))] (see _retention_writes)."""
    N, C = lr.shape[-2:]
    chunk = torch.arange(N, device=lr.device)
    last = torch.full((N,), C - 1, device=lr.device)
    last[-1] = (length - 1) % C
    retain = _segsum(log_retention).exp()              # [i, l] = prod_{l < j <= i} r_j
    state = log_retention.cumsum(-1).exp()             # prod_{j <= i} r_j
    momentum = momentum_state = momentum_tokens = None
    if log_momentum is None:
        tokens = retain * lr.unsqueeze(-2)
    else:
        carry = _segsum(log_momentum).exp()            # [l, j] = prod_{j < s <= l} m_s
        tokens = (retain @ carry) * lr.unsqueeze(-2)   # token j reaches W_i through every S_l, j <= l <= i
        cum_momentum = log_momentum.cumsum(-1).exp()
        momentum = (retain @ cum_momentum.unsqueeze(-1)).squeeze(-1)
        momentum_state = cum_momentum[:, :, chunk, last]
        momentum_tokens = carry[:, :, chunk, last] * lr
    end_state, end_tokens = state[:, :, chunk, last], tokens[:, :, chunk, last]
    end_momentum = None if momentum is None else momentum[:, :, chunk, last]
    if not read_after_write:  # position i reads the state left by token i-1
        state = F.pad(state[..., :-1], (1, 0), value=1.0)
        tokens = F.pad(tokens[..., :-1, :], (0, 0, 1, 0))
        momentum = None if momentum is None else F.pad(momentum[..., :-1], (1, 0))
    return state, tokens, end_state, end_tokens, momentum, end_momentum, momentum_state, momentum_tokens


def _unbind(x: Tensor | None, N: int) -> list:
    """Chunk list along the N axis (dim 2); None stays None for every chunk."""
    return [None] * N if x is None else list(x.unbind(2))


def _read(W0: Tensor, z: Tensor, x: Tensor, w: Tensor, wr: _Writes, S0: Tensor | None = None) -> Tensor:
    """W_i z_i for every position i of one chunk. z, x [B, H, C, din]; w [B, H, C, dout]; W0 [B, H, dout, din]."""
    out = wr.read_state[..., None] * (z @ W0.mT)
    if S0 is not None:
        out = out + wr.read_momentum[..., None] * (z @ S0.mT)
    return out + ((z @ x.mT) * wr.read_tokens) @ w


def _end(W0: Tensor, x: Tensor, w: Tensor, wr: _Writes, S0: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W, S) at the end of one chunk."""
    W = wr.end_state[..., None, None] * W0 + (w * wr.end_tokens[..., None]).mT @ x
    if S0 is None:
        return W, None
    W = W + wr.end_momentum[..., None, None] * S0
    S = wr.momentum_state[..., None, None] * S0 + (w * wr.momentum_tokens[..., None]).mT @ x
    return W, S


def _ut_transform(k: Tensor, log_a: Tensor, b: Tensor) -> Tensor:
    """(I + A)^{-1} with A_ij = b_i (Gamma_i / Gamma_j) k_i.k_j for j < i (chunked [B, H, N, C, C]).

    Unrolling S_t = a_t S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T inside a chunk as
    S_i = Gamma_i S_0 + sum_{j<=i} (Gamma_i/Gamma_j) u_j k_j^T gives the triangular system
    (I + A) U = diag(b) V - diag(b Gamma) K S_0^T for the pseudo-values u (DeltaNet's WY/UT form).
    """
    C = k.shape[-2]
    A = (b.unsqueeze(-1) * _segsum(log_a).exp() * (k @ k.mT)).tril(-1)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    return torch.linalg.solve_triangular(eye + A, eye.expand_as(A).contiguous(), upper=False, unitriangular=True)


def _init_state(state: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if state is None:
        return like.new_zeros(shape)
    return state.expand(shape)


def _check_objective(objective: str) -> None:
    if objective not in ("l2", "dot"):
        raise ValueError(f"objective must be 'l2' or 'dot', got '{objective}'")


# ----------------------------------------------------------------------------------------------
# linear memory, dot objective: Hebbian rule / linear attention with decay


def hebbian_rule(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, chunk_size: int,
                 initial_state: Tensor | None = None, read_after_write: bool = True) -> tuple[Tensor, Tensor]:
    """S_t = a_t S_{t-1} + b_t v_t k_t^T (GD with lr b on -<S k, v> plus decay a). Returns (o, S)."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    S = _init_state(initial_state, (B, H, dv, dk), v)
    chunks = [_to_chunks(x, chunk_size).unbind(2) for x in (q, k, v)]
    writes = _retention_writes(_to_chunks(b, chunk_size), _to_chunks(a.log(), chunk_size), None, read_after_write, T)
    outs = []
    for qn, kn, vn, wr in zip(*chunks, writes):
        outs.append(_read(S, qn, kn, vn, wr))
        S, _ = _end(S, kn, vn, wr)
    return _from_chunks(torch.stack(outs, 2), T), S


def hebbian_rule_reference(q, k, v, a, b, initial_state=None, read_after_write=True):
    B, H, T, dk = k.shape
    S = _init_state(initial_state, (B, H, v.shape[-1], dk), v)
    outs = []
    for t in range(T):
        if not read_after_write:
            outs.append(S @ q[:, :, t, :, None])
        S = a[:, :, t, None, None] * S + b[:, :, t, None, None] * v[:, :, t, :, None] @ k[:, :, t, None, :]
        if read_after_write:
            outs.append(S @ q[:, :, t, :, None])
    return torch.stack(outs, 2).squeeze(-1), S


# ----------------------------------------------------------------------------------------------
# delta rule and gated delta rule (WY / UT transform)


def _gated_delta(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, b: Tensor, chunk_size: int,
                 initial_state: Tensor | None, read_after_write: bool,
                 start_coef: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """S_t = a_t S_{t-1}(I - b_t k_t k_t^T) + b_t (v_t - c_t S_0 k_t) k_t^T, S_0 the chunk-start state.

    c = start_coef (absent: 0) lets DGD's `l2` reading subtract the chunk-start prediction.
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    S = _init_state(initial_state, (B, H, dv, dk), v)
    qc, kc, vc = (_to_chunks(x, chunk_size) for x in (q, k, v))
    la, bc = _to_chunks(log_a, chunk_size), _to_chunks(b, chunk_size)
    ut = _ut_transform(kc, la, bc)
    gamma = la.cumsum(-1).exp()
    bk = (bc * gamma if start_coef is None else bc * (gamma + _to_chunks(start_coef, chunk_size)))
    values = ut @ (bc.unsqueeze(-1) * vc)          # pseudo-values before the S_0 correction
    keys = ut @ (bk.unsqueeze(-1) * kc)            # u = values - keys S_0^T
    writes = _retention_writes(torch.ones_like(bc), la, None, read_after_write, T)
    outs = []
    for qn, kn, values_n, keys_n, wr in zip(qc.unbind(2), kc.unbind(2), values.unbind(2), keys.unbind(2), writes):
        u = values_n - keys_n @ S.mT
        outs.append(_read(S, qn, kn, u, wr))
        S, _ = _end(S, kn, u, wr)
    return _from_chunks(torch.stack(outs, 2), T), S


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, chunk_size: int,
                     initial_state: Tensor | None = None, read_after_write: bool = True) -> tuple[Tensor, Tensor]:
    """S_t = a_t S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T (Gated DeltaNet). Returns (o, S)."""
    return _gated_delta(q, k, v, a.log(), b, chunk_size, initial_state, read_after_write)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, b: Tensor, chunk_size: int,
               initial_state: Tensor | None = None, read_after_write: bool = True) -> tuple[Tensor, Tensor]:
    """S_t = S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T (DeltaNet). Returns (o, S)."""
    return _gated_delta(q, k, v, torch.zeros_like(b), b, chunk_size, initial_state, read_after_write)


def gated_delta_rule_reference(q, k, v, a, b, initial_state=None, read_after_write=True):
    B, H, T, dk = k.shape
    S = _init_state(initial_state, (B, H, v.shape[-1], dk), v)
    eye = torch.eye(dk, dtype=k.dtype, device=k.device)
    outs = []
    for t in range(T):
        if not read_after_write:
            outs.append(S @ q[:, :, t, :, None])
        kt, bt = k[:, :, t, :, None], b[:, :, t, None, None]
        S = a[:, :, t, None, None] * S @ (eye - bt * kt @ kt.mT) + bt * v[:, :, t, :, None] @ kt.mT
        if read_after_write:
            outs.append(S @ q[:, :, t, :, None])
    return torch.stack(outs, 2).squeeze(-1), S


def delta_rule_reference(q, k, v, b, initial_state=None, read_after_write=True):
    return gated_delta_rule_reference(q, k, v, torch.ones_like(b), b, initial_state, read_after_write)


# ----------------------------------------------------------------------------------------------
# Delta Gradient Descent with retention, linear memory (Nested Learning Eqs. 57, 88, 92, 93)


def dgd_effective_lr(eta: Tensor | float, key_norm_sq: Tensor | float = 1.0):
    """eta' = eta / (1 + eta |x|^2): the step that makes DGD's closed form (Eq. 57) the exact
    proximal solution of argmin_W 1/2|W x - u|^2 + 1/(2 eta)|W - W_t|^2."""
    return eta / (1 + eta * key_norm_sq)


def dgd_linear(q: Tensor, k: Tensor, v_hat: Tensor, alpha: Tensor, eta: Tensor, chunk_size: int,
               objective: str = "l2", initial_state: Tensor | None = None,
               read_after_write: bool = True) -> tuple[Tensor, Tensor]:
    """DGD with retention on a linear memory (alpha: retention, eta: step):

    `dot`: M_t = M_{t-1}(alpha_t I - eta_t k_t k_t^T) + eta_t v_hat_t k_t^T
    `l2`:  M_t = M_{t-1}(alpha_t I - eta_t k_t k_t^T) + eta_t (v_hat_t - M_0 k_t) k_t^T, M_0 = chunk start

    Both are the gated delta rule with a = alpha, b = eta / alpha and v' = alpha v_hat
    (`l2`: v' = alpha (v_hat - M_0 k)). Keep eta <= alpha for `l2` at small chunks (docs/design.md).
    """
    _check_objective(objective)
    return _gated_delta(q, k, alpha.unsqueeze(-1) * v_hat, alpha.log(), eta / alpha, chunk_size,
                        initial_state, read_after_write, alpha if objective == "l2" else None)


def dgd_linear_reference(q, k, v_hat, alpha, eta, chunk_size, objective="l2", initial_state=None,
                         read_after_write=True):
    _check_objective(objective)
    B, H, T, dk = k.shape
    M = _init_state(initial_state, (B, H, v_hat.shape[-1], dk), v_hat)
    eye = torch.eye(dk, dtype=k.dtype, device=k.device)
    outs = []
    for t in range(T):
        if t % chunk_size == 0:
            M0 = M
        if not read_after_write:
            outs.append(M @ q[:, :, t, :, None])
        kt, et, at = k[:, :, t, :, None], eta[:, :, t, None, None], alpha[:, :, t, None, None]
        target = v_hat[:, :, t, :, None]
        if objective == "l2":
            target = target - M0 @ kt
        M = M @ (at * eye - et * kt @ kt.mT) + et * target @ kt.mT
        if read_after_write:
            outs.append(M @ q[:, :, t, :, None])
    return torch.stack(outs, 2).squeeze(-1), M


# ----------------------------------------------------------------------------------------------
# linear memory, GD with momentum and weight decay (Titans §3.1-3.2)


class GDState(NamedTuple):
    memory: Tensor                  # M [B, H, dv, dk]
    momentum: Tensor | None = None  # S [B, H, dv, dk]


def gd_linear(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, chunk_size: int, momentum: Tensor | None = None,
              retention: Tensor | None = None, initial_state: GDState | Tensor | None = None,
              objective: str = "l2", read_after_write: bool = True) -> tuple[Tensor, GDState]:
    """Titans' update on a linear memory, gradients at the chunk-start state M_0:

        g_t = grad L(M_0; k_t, v_t)            (l2: (M_0 k_t - v_t) k_t^T, dot: -v_t k_t^T)
        S_t = momentum_t S_{t-1} - lr_t g_t    (no momentum: S_t = -lr_t g_t)
        M_t = retention_t M_{t-1} + S_t        (Titans: retention = 1 - alpha)
    """
    _check_objective(objective)
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    if not isinstance(initial_state, GDState):
        initial_state = GDState(initial_state)
    M = _init_state(initial_state.memory, (B, H, dv, dk), v)
    S = None
    if momentum is not None:
        S = _init_state(initial_state.momentum, (B, H, dv, dk), v)
    log_ret = torch.zeros_like(lr) if retention is None else retention.log()
    writes = _retention_writes(_to_chunks(lr, chunk_size), _to_chunks(log_ret, chunk_size),
                               None if momentum is None else _to_chunks(momentum.log(), chunk_size),
                               read_after_write, T)
    chunks = [_to_chunks(x, chunk_size).unbind(2) for x in (q, k, v)]
    outs = []
    for qn, kn, vn, wr in zip(*chunks, writes):
        w = vn - kn @ M.mT if objective == "l2" else vn   # minus the gradient's value side
        outs.append(_read(M, qn, kn, w, wr, S))
        M, S = _end(M, kn, w, wr, S)
    return _from_chunks(torch.stack(outs, 2), T), GDState(M, S)


def gd_linear_reference(q, k, v, lr, chunk_size, momentum=None, retention=None, initial_state=None,
                        objective="l2", read_after_write=True):
    _check_objective(objective)
    B, H, T, dk = k.shape
    shape = (B, H, v.shape[-1], dk)
    if not isinstance(initial_state, GDState):
        initial_state = GDState(initial_state)
    M = _init_state(initial_state.memory, shape, v)
    S = None if momentum is None else _init_state(initial_state.momentum, shape, v)
    outs = []
    for t in range(T):
        if t % chunk_size == 0:
            M0 = M
        if not read_after_write:
            outs.append(M @ q[:, :, t, :, None])
        kt, vt = k[:, :, t, :, None], v[:, :, t, :, None]
        grad = ((M0 @ kt - vt) if objective == "l2" else -vt) @ kt.mT
        step = -lr[:, :, t, None, None] * grad
        if S is not None:
            S = momentum[:, :, t, None, None] * S + step
            step = S
        keep = 1.0 if retention is None else retention[:, :, t, None, None]
        M = keep * M + step
        if read_after_write:
            outs.append(M @ q[:, :, t, :, None])
    return torch.stack(outs, 2).squeeze(-1), GDState(M, S)


# ----------------------------------------------------------------------------------------------
# 2-layer residual MLP memory M(x) = x + W1 s(W2 x)


class MLPMemoryState(NamedTuple):
    w1: Tensor                # [B, H, d, dh] output layer
    w2: Tensor                # [B, H, dh, d] input layer
    m1: Tensor | None = None  # momentum of w1
    m2: Tensor | None = None  # momentum of w2


def _activation(name: str):
    """(s, s') pairs; the derivative is explicit because the chunked form needs it batched."""
    if name == "silu":
        return F.silu, lambda z: torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z)))
    if name == "gelu":
        return F.gelu, lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if name == "tanh":
        return torch.tanh, lambda z: 1 - torch.tanh(z) ** 2
    raise ValueError(f"activation must be silu, gelu or tanh, got '{name}'")


def mlp_memory_apply(state: MLPMemoryState, x: Tensor, activation: str = "silu") -> Tensor:
    """M(x) = x + W1 s(W2 x) for x [B, H, T, d]."""
    act, _ = _activation(activation)
    return x + act(x @ state.w2.mT) @ state.w1.mT


def _check_mlp_update(update: str, momentum) -> None:
    if update not in ("gd", "dgd"):
        raise ValueError(f"update must be 'gd' or 'dgd', got '{update}'")
    if update == "dgd" and momentum is not None:
        raise ValueError("update='dgd' has no momentum form here; pass momentum=None")


def mlp_memory_chunk(W1: Tensor, W2: Tensor, S1: Tensor | None, S2: Tensor | None, qn: Tensor, kn: Tensor,
                     vn: Tensor, lrn: Tensor, wr1: _Writes, wr2: _Writes, ut_n: Tensor | None,
                     keys2_n: Tensor | None, activation: str, objective: str, update: str):
    """One chunk of `mlp_memory`: reads of every position, then the chunk-end (W1, W2, S1, S2)."""
    act, act_grad = _activation(activation)
    # per-token gradients at the chunk-start weights: dL/dy = e, g1 = e h^T, g2 = d2 k^T
    z = kn @ W2.mT
    h = act(z)
    e = kn + h @ W1.mT - vn if objective == "l2" else -vn
    d2 = (e @ W1) * act_grad(z)
    if update == "gd":
        w2 = -d2
    else:  # pseudo-values of the W2 delta rule: u = T diag(b) v' - T diag(b Gamma) K W2_0^T, b v' = -eta d2
        w2 = ut_n @ (-lrn.unsqueeze(-1) * d2) - keys2_n @ W2.mT
    hq = act(_read(W2, qn, kn, w2, wr2, S2))
    out = qn + _read(W1, hq, h, -e, wr1, S1)
    W2, S2 = _end(W2, kn, w2, wr2, S2)
    W1, S1 = _end(W1, h, -e, wr1, S1)
    return out, (W1, W2, S1, S2)


def mlp_memory(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, chunk_size: int, initial_state: MLPMemoryState,
               momentum: Tensor | None = None, retention: Tensor | None = None, update: str = "gd",
               objective: str = "l2", activation: str = "silu",
               read_after_write: bool = True, compile: bool = False) -> tuple[Tensor, MLPMemoryState]:
    """Residual MLP memory trained in context, per-token gradients g_t at the chunk-start state.

    `gd`:  per weight W in {W1, W2}: S_t = momentum_t S_{t-1} - lr_t g_t (no momentum: S_t = -lr_t g_t),
           W_t = retention_t W_{t-1} + S_t.
    `dgd`: Delta Gradient Descent with retention alpha = `retention`, step eta = `lr`. Its
           (alpha I - eta k k^T) factor acts on W2, the layer whose input is k:
           W2_t = W2_{t-1}(alpha_t I - eta_t k_t k_t^T) - eta_t g2_t,  W1_t = alpha_t W1_{t-1} - eta_t g1_t.
           W2 is then a gated delta rule (a = alpha, b = eta/alpha, b v' = -eta d2 where g2 = d2 k^T).
    Initial weights may be [H, ...] (a meta-learned initial state shared by the batch) or [B, H, ...].
    `compile`: each chunk's step runs through torch.compile in grad-enabled forwards (`chunk_step`).
    """
    _check_objective(objective)
    _check_mlp_update(update, momentum)
    B, H, T, d = k.shape
    dh = initial_state.w2.shape[-2]
    W1 = initial_state.w1.expand(B, H, d, dh)
    W2 = initial_state.w2.expand(B, H, dh, d)
    S1 = S2 = None
    if momentum is not None:
        S1 = _init_state(initial_state.m1, (B, H, d, dh), v)
        S2 = _init_state(initial_state.m2, (B, H, dh, d), v)

    qc, kc, vc = (_to_chunks(x, chunk_size) for x in (q, k, v))
    lrc = _to_chunks(lr, chunk_size)
    log_ret = _to_chunks(torch.zeros_like(lr) if retention is None else retention.log(), chunk_size)
    log_mom = None if momentum is None else _to_chunks(momentum.log(), chunk_size)
    writes1 = _retention_writes(lrc, log_ret, log_mom, read_after_write, T, compile)
    N = qc.shape[2]
    ut = keys2 = [None] * N
    if update == "gd":
        writes2 = writes1
    else:
        b = lrc / log_ret.exp()
        ut = _ut_transform(kc, log_ret, b)
        keys2 = (ut @ ((b * log_ret.cumsum(-1).exp()).unsqueeze(-1) * kc)).unbind(2)
        ut = ut.unbind(2)
        writes2 = _retention_writes(torch.ones_like(lrc), log_ret, None, read_after_write, T, compile)

    outs = []
    step = chunk_step(mlp_memory_chunk, compile)
    per_chunk = zip(qc.unbind(2), kc.unbind(2), vc.unbind(2), lrc.unbind(2), writes1, writes2, ut, keys2)
    for qn, kn, vn, lrn, wr1, wr2, ut_n, keys2_n in per_chunk:
        out, (W1, W2, S1, S2) = step(W1, W2, S1, S2, qn, kn, vn, lrn, wr1, wr2, ut_n, keys2_n,
                                      activation, objective, update)
        outs.append(out)
    return _from_chunks(torch.stack(outs, 2), T), MLPMemoryState(W1, W2, S1, S2)


def mlp_memory_reference(q, k, v, lr, chunk_size, initial_state, momentum=None, retention=None, update="gd",
                         objective="l2", activation="silu", read_after_write=True):
    """Token by token; gradients by autograd (create_graph, so it can be differentiated too)."""
    _check_objective(objective)
    _check_mlp_update(update, momentum)
    B, H, T, d = k.shape
    dh = initial_state.w2.shape[-2]
    W1 = initial_state.w1.expand(B, H, d, dh)
    W2 = initial_state.w2.expand(B, H, dh, d)
    S1 = S2 = None
    if momentum is not None:
        S1 = _init_state(initial_state.m1, (B, H, d, dh), v)
        S2 = _init_state(initial_state.m2, (B, H, dh, d), v)
    eye = torch.eye(d, dtype=k.dtype, device=k.device)
    outs = []

    def read(W1, W2, x):
        return mlp_memory_apply(MLPMemoryState(W1, W2), x[:, :, None], activation)[:, :, 0]

    for t in range(T):
        if t % chunk_size == 0:
            W1_0, W2_0 = W1, W2
        if not read_after_write:
            outs.append(read(W1, W2, q[:, :, t]))
        with torch.enable_grad():
            p1, p2 = (w if w.requires_grad else w.detach().requires_grad_() for w in (W1_0, W2_0))
            pred = read(p1, p2, k[:, :, t])
            vt = v[:, :, t]
            loss = 0.5 * ((pred - vt) ** 2).sum() if objective == "l2" else -(pred * vt).sum()
            g1, g2 = torch.autograd.grad(loss, (p1, p2), create_graph=True)
        eta = lr[:, :, t, None, None]
        keep = 1.0 if retention is None else retention[:, :, t, None, None]
        if update == "dgd":
            kt = k[:, :, t, :, None]
            W2 = W2 @ (keep * eye - eta * kt @ kt.mT) - eta * g2
            W1 = keep * W1 - eta * g1
        elif momentum is None:
            W1, W2 = keep * W1 - eta * g1, keep * W2 - eta * g2
        else:
            m = momentum[:, :, t, None, None]
            S1, S2 = m * S1 - eta * g1, m * S2 - eta * g2
            W1, W2 = keep * W1 + S1, keep * W2 + S2
        if read_after_write:
            outs.append(read(W1, W2, q[:, :, t]))
    return torch.stack(outs, 2), MLPMemoryState(W1, W2, S1, S2)
