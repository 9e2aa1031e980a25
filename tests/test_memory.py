"""Associative-memory update rules: chunk-parallel forms against token-by-token references (float64),
and DGD's closed form against an explicit proximal solve."""
import pytest
import torch
import torch.nn.functional as F

from nlcl.models import memory as mem



@pytest.fixture(autouse=True)
def _one_thread():
    # tiny ops: a second intra-op thread only adds spin-waiting (badly so on a shared, loaded machine)
    torch.set_num_threads(1)
DT = torch.float64
B, H, D, DH = 2, 2, 5, 7


def make_inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)
    u = lambda *s: torch.rand(*s, generator=g, dtype=DT)
    return dict(
        q=r(B, H, T, D), k=F.normalize(r(B, H, T, D), dim=-1), v=r(B, H, T, D),
        decay=0.5 + 0.5 * u(B, H, T),      # a, alpha, retention: (0.5, 1)
        step=u(B, H, T),                   # b, lr, eta / alpha: (0, 1)
        momentum=u(B, H, T),
        S0=r(B, H, D, D),
        mlp=mem.MLPMemoryState(0.4 * r(H, D, DH), 0.4 * r(H, DH, D)),
    )


# Each rule: (inputs, chunk_size, read_after_write, reference?) -> (o, [final state tensors]).
def hebbian(x, C, raw, ref):
    args = (x["q"], x["k"], x["v"], x["decay"], x["step"])
    o, S = mem.hebbian_rule_reference(*args, x["S0"], raw) if ref else mem.hebbian_rule(*args, C, x["S0"], raw)
    return o, [S]


def delta(x, C, raw, ref):
    args = (x["q"], x["k"], x["v"], x["step"])
    o, S = mem.delta_rule_reference(*args, x["S0"], raw) if ref else mem.delta_rule(*args, C, x["S0"], raw)
    return o, [S]


def gated_delta(x, C, raw, ref):
    args = (x["q"], x["k"], x["v"], x["decay"], x["step"])
    if ref:
        o, S = mem.gated_delta_rule_reference(*args, initial_state=x["S0"], read_after_write=raw)
    else:
        o, S = mem.gated_delta_rule(*args, C, initial_state=x["S0"], read_after_write=raw)
    return o, [S]


def dgd(objective):
    def rule(x, C, raw, ref):
        # eta = alpha * b <= alpha keeps the l2 reading stable at chunk size 1
        fn = mem.dgd_linear_reference if ref else mem.dgd_linear
        o, S = fn(x["q"], x["k"], x["v"], x["decay"], x["decay"] * x["step"], C, objective, x["S0"], raw)
        return o, [S]
    return rule


def gd_linear(with_momentum, objective="l2"):
    def rule(x, C, raw, ref):
        fn = mem.gd_linear_reference if ref else mem.gd_linear
        momentum = x["momentum"] if with_momentum else None
        init = mem.GDState(x["S0"], 0.3 * x["S0"].flip(-1) if with_momentum else None)
        o, st = fn(x["q"], x["k"], x["v"], x["step"], C, momentum=momentum, retention=x["decay"],
                   initial_state=init, objective=objective, read_after_write=raw)
        return o, [t for t in st if t is not None]
    return rule


def mlp(**kw):
    def rule(x, C, raw, ref):
        fn = mem.mlp_memory_reference if ref else mem.mlp_memory
        kw2 = {key: x[val] for key, val in kw.items() if key in ("momentum", "retention")}
        kw2.update({key: val for key, val in kw.items() if key not in ("momentum", "retention")})
        o, st = fn(x["q"], x["k"], x["v"], x["step"], C, x["mlp"], read_after_write=raw, **kw2)
        return o, [t for t in st if t is not None]
    return rule


RULES = {
    "hebbian": hebbian,
    "delta": delta,
    "gated_delta": gated_delta,
    "dgd_l2": dgd("l2"),
    "dgd_dot": dgd("dot"),
    "gd_linear_plain": gd_linear(False),
    "gd_linear_momentum": gd_linear(True),
    "gd_linear_dot": gd_linear(True, "dot"),
    "mlp_gd": mlp(),
    "mlp_gd_momentum_retention": mlp(momentum="momentum", retention="decay"),
    "mlp_dgd": mlp(update="dgd", retention="decay"),
    "mlp_dot_gelu": mlp(objective="dot", retention="decay", activation="gelu"),
    "mlp_tanh_momentum": mlp(momentum="momentum", activation="tanh"),
}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("read_after_write", [True, False])
@pytest.mark.parametrize("T", [13, 16])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
@pytest.mark.parametrize("rule", list(RULES))
def test_chunked_matches_reference(rule, chunk_size, T, read_after_write):
    x = make_inputs(T, seed=T * 100 + chunk_size)
    o, states = RULES[rule](x, chunk_size, read_after_write, ref=False)
    o_ref, states_ref = RULES[rule](x, chunk_size, read_after_write, ref=True)
    assert o.shape == o_ref.shape == (B, H, T, D)
    assert len(states) == len(states_ref)
    assert rel_err(o, o_ref) < 1e-10
    for s, s_ref in zip(states, states_ref):
        assert s.shape == s_ref.shape
        assert rel_err(s, s_ref) < 1e-10


@pytest.mark.parametrize("rule", list(RULES))
def test_chunked_gradients_match_reference(rule):
    """Backward through the chunked form equals backward through the token loop."""
    def grads(ref):
        x = make_inputs(13, seed=7)
        leaves = [x[n].requires_grad_() for n in ("q", "k", "v", "decay", "step", "momentum", "S0")]
        leaves += [w.requires_grad_() for w in x["mlp"][:2]]
        o, states = RULES[rule](x, 4, True, ref)
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=DT)).sum() for t in [o, *states])
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    used = 0
    for g, g_ref in zip(grads(False), grads(True)):
        assert (g is None) == (g_ref is None)
        if g is not None:
            used += 1
            assert rel_err(g, g_ref) < 1e-9
    assert used >= 4


def test_chunk_size_changes_gd_rules_but_not_exact_recurrences():
    """Gradients at the chunk-start state make GD rules depend on the chunk size; recurrences do not."""
    x = make_inputs(16)
    for rule in ("hebbian", "delta", "gated_delta", "dgd_dot"):
        assert rel_err(RULES[rule](x, 3, True, False)[0], RULES[rule](x, 16, True, False)[0]) < 1e-12
    for rule in ("dgd_l2", "gd_linear_momentum", "mlp_gd"):
        assert rel_err(RULES[rule](x, 1, True, False)[0], RULES[rule](x, 16, True, False)[0]) > 1e-3


def test_read_before_write_is_shifted_read_after_write():
    x = make_inputs(13)
    for rule in RULES:
        after, _ = RULES[rule](x, 4, True, False)
        before, _ = RULES[rule](x, 4, False, False)
        # position t+1 reads before writing what position t read after writing
        M_q_shift = RULES[rule]({**x, "q": x["q"].roll(-1, dims=2)}, 4, True, False)[0]
        assert rel_err(before[:, :, 1:], M_q_shift[:, :, :-1]) < 1e-10, rule
        assert rel_err(before, after) > 1e-3


def proximal_step(W, x, u, eta):
    """argmin_W' 1/2 |W' x - u|^2 + 1/(2 eta) |W' - W|^2, by solving (x x^T + I/eta) W'^T = x u^T + W^T/eta."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    lhs = x[..., :, None] * x[..., None, :] + eye / eta[..., None, None]
    rhs = x[..., :, None] * u[..., None, :] + W.mT / eta[..., None, None]
    return torch.linalg.solve(lhs, rhs).mT


@pytest.mark.parametrize("key_norm", [1.0, 2.5])
def test_dgd_closed_form_is_the_proximal_solution(key_norm):
    x = make_inputs(6, seed=3)
    k = key_norm * x["k"]
    eta = 0.1 + 2 * x["step"]                 # proximal step sizes, not all small
    eta_prime = mem.dgd_effective_lr(eta, key_norm ** 2)

    # Eq. 57 (Sherman-Morrison) for one token vs the explicit solve
    W, kt, ut, et = x["S0"], k[:, :, 0], x["v"][:, :, 0], eta[:, :, 0]
    ep = eta_prime[:, :, 0, None, None]
    eq57 = W @ (torch.eye(D, dtype=DT) - ep * kt[..., :, None] * kt[..., None, :]) + ep * ut[..., :, None] * kt[..., None, :]
    assert rel_err(eq57, proximal_step(W, kt, ut, et)) < 1e-12

    # a sequence of proximal steps == dgd_linear (dot objective, alpha = 1, eta') for any chunk size
    W_prox = W
    for t in range(k.shape[2]):
        W_prox = proximal_step(W_prox, k[:, :, t], x["v"][:, :, t], eta[:, :, t])
    for C in (1, 4):
        _, W_dgd = mem.dgd_linear(x["q"], k, x["v"], torch.ones_like(eta), eta_prime, C, "dot", W)
        assert rel_err(W_dgd, W_prox) < 1e-10


def test_dgd_is_the_gated_delta_rule():
    """The reduction of docs/design.md, checked through the public functions: a = alpha, b = eta/alpha, v' = alpha v_hat."""
    x = make_inputs(13, seed=5)
    alpha, eta = x["decay"], x["decay"] * x["step"]
    o1, S1 = mem.dgd_linear(x["q"], x["k"], x["v"], alpha, eta, 4, "dot", x["S0"])
    o2, S2 = mem.gated_delta_rule(x["q"], x["k"], alpha[..., None] * x["v"], alpha, eta / alpha, 4, x["S0"])
    assert rel_err(o1, o2) < 1e-12 and rel_err(S1, S2) < 1e-12


def test_mlp_memory_apply_and_broadcast_initial_state():
    x = make_inputs(5)
    o, st = mem.mlp_memory(x["q"], x["k"], x["v"], torch.zeros_like(x["step"]), 2, x["mlp"])
    # zero learning rate: the memory is its initial state, read as x + W1 s(W2 x)
    expect = x["q"] + F.silu(x["q"] @ x["mlp"].w2.mT) @ x["mlp"].w1.mT
    assert rel_err(o, expect) < 1e-12
    assert st.w1.shape == (B, H, D, DH) and st.w2.shape == (B, H, DH, D)


def test_invalid_options_raise():
    x = make_inputs(4)
    with pytest.raises(ValueError):
        mem.dgd_linear(x["q"], x["k"], x["v"], x["decay"], x["step"], 2, objective="mse")
    with pytest.raises(ValueError):
        mem.mlp_memory(x["q"], x["k"], x["v"], x["step"], 2, x["mlp"], momentum=x["momentum"], update="dgd")
    with pytest.raises(ValueError):
        mem.mlp_memory(x["q"], x["k"], x["v"], x["step"], 2, x["mlp"], activation="relu6")
