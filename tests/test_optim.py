"""Nested Learning optimizers and multi-frequency stepping (nlcl.optim)."""
import copy
import io

import pytest
import torch
from torch import nn

from nlcl.levels import LevelSpec, tag
from nlcl.optim.multifrequency import ACCUMULATIONS
from nlcl.optim import (DGDOuter, DMGD, M3, OPTIMIZERS, DeltaMomentum, M3Stabilized, MultiFrequencyOptimizer,
                        Muon, build_optimizer, dgd_update, muon_param_groups, newton_schulz)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed=0, periods=(3,), lr_scales=None):
    """Linear -> tanh -> Linear -> tanh -> Linear; the last len(periods) Linears get levels."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    linears = [model[2], model[4]][-len(periods):] if periods else []
    for i, (layer, period) in enumerate(zip(linears, periods)):
        scale = lr_scales[i] if lr_scales else 1.0
        tag(layer, LevelSpec(f"level{i}", period, lr_scale=scale))
    return model


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def train(model, opt, data):
    for batch in data:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()  # .grad is one step's gradient: slow levels keep their periods in the optimizer


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- multi-frequency stepping

def test_slow_level_changes_only_at_period_end_by_summed_gradient():
    C, lr, scale, steps = 3, 0.1, 0.5, 10
    model = make_model(periods=(C,), lr_scales=[scale])
    ref = copy.deepcopy(model)
    opt = MultiFrequencyOptimizer(model, lambda groups: torch.optim.SGD(groups), lr)
    slow = {id(p) for p in model[4].parameters()}
    assert {spec.name: spec.period for spec in opt.levels.values()} == {"outer": 1, "level0": C}

    # Independent reference: plain autograd; fast parameters move every step, the slow layer keeps a
    # running sum of its gradients (all at its frozen parameters) and takes one SGD step on the sum.
    ref_slow = list(ref[4].parameters())
    ref_fast = [p for p in ref.parameters() if all(p is not q for q in ref_slow)]
    sums = [torch.zeros_like(p) for p in ref_slow]
    for t, batch in enumerate(batches(steps), start=1):
        before = snapshot(model)
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()

        grads = torch.autograd.grad(loss_fn(ref, batch), ref_fast + ref_slow)
        with torch.no_grad():
            for p, g in zip(ref_fast, grads[:len(ref_fast)]):
                p -= lr * g
        for s, g in zip(sums, grads[len(ref_fast):]):
            s += g
        if t % C == 0:
            sgd = torch.optim.SGD(ref_slow, lr=lr * scale)
            for p, s in zip(ref_slow, sums):
                p.grad = s.clone()
            sgd.step()
            for p, s in zip(ref_slow, sums):
                p.grad = None
                s.zero_()

        for p, b, r in zip(model.parameters(), before, ref.parameters()):
            changed = not torch.equal(p, b)
            if id(p) in slow:
                assert changed == (t % C == 0), f"slow level changed={changed} at step {t}"
            else:
                assert changed, f"fast level did not change at step {t}"
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert opt.step_count == steps


def test_period_one_levels_match_plain_adamw_bitwise():
    data = batches(6)
    for periods in [(), (1,), (1, 1)]:
        model = make_model(periods=periods)
        plain_model = copy.deepcopy(model)
        opt = MultiFrequencyOptimizer(model, lambda groups: torch.optim.AdamW(groups, weight_decay=0.01), 1e-2)
        plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.01)
        train(model, opt, data)
        train(plain_model, plain, data)
        for p, q in zip(model.parameters(), plain_model.parameters()):
            assert torch.equal(p, q), f"periods={periods}"


def test_factory_adamw_without_levels_matches_plain_adamw():
    data = batches(5)
    model = make_model(periods=())
    plain_model = copy.deepcopy(model)
    opt = build_optimizer(model, "adamw", lr=3e-3, weight_decay=0.1, betas=(0.8, 0.95))
    plain = torch.optim.AdamW(plain_model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.8, 0.95))
    train(model, opt, data)
    train(plain_model, plain, data)
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)


def test_zero_grad_clears_every_grad_and_the_pending_sum_lives_in_the_optimizer():
    model = make_model(periods=(2,))
    opt = MultiFrequencyOptimizer(model, lambda groups: torch.optim.SGD(groups), 0.1)
    batch = batches(1)[0]
    loss_fn(model, batch).backward()
    fresh = [p.grad.clone() for p in model[4].parameters()]
    opt.step()  # step 1: outer steps, level0 (period 2) keeps the gradient in its accumulator
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for a, g in zip(opt.accumulators["level0"], fresh):
        assert torch.equal(a, g)
    assert "outer" not in opt.accumulators  # a period-1 level needs no accumulator


def test_tied_parameters_are_optimized_once():
    torch.manual_seed(0)
    embed, head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    opt = MultiFrequencyOptimizer(model, lambda groups: torch.optim.SGD(groups), 0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == 1
    tag(head, LevelSpec("slow", 2))
    with pytest.raises(ValueError, match="tied"):
        MultiFrequencyOptimizer(model, lambda groups: torch.optim.SGD(groups), 0.1)


def test_closure_loss_is_returned():
    model = make_model(periods=(2,))
    opt = MultiFrequencyOptimizer(model, lambda groups: torch.optim.SGD(groups), 0.1)
    batch = batches(1)[0]

    def closure():
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
    assert all(p.grad is not None for p in model[4].parameters())


def test_param_groups_and_state_expose_the_inner_optimizers():
    model = make_model(periods=(2, 4), lr_scales=[0.5, 0.25])
    opt = MultiFrequencyOptimizer(model, lambda groups: torch.optim.AdamW(groups), 0.1)
    assert len(opt.param_groups) == 3
    assert sorted(g["lr"] for g in opt.param_groups) == [0.025, 0.05, 0.1]
    listed = {id(p) for g in opt.param_groups for p in g["params"]}
    assert listed == {id(p) for p in model.parameters()}

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # scales every level's lr
    assert sorted(g["lr"] for opt_ in opt.inner.values() for g in opt_.param_groups) == [0.0125, 0.025, 0.05]
    train(model, opt, batches(4))
    sched.step()
    w = model[0].weight
    assert torch.equal(opt.state[w]["exp_avg"], opt.inner["outer"].state[w]["exp_avg"])
    assert len(opt.state) == sum(len(o.state) for o in opt.inner.values()) == 6
    total = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    assert torch.isfinite(total)


def test_level_stats_count_level_steps_and_report_norms():
    lr = 0.1
    model = make_model(periods=(2, 3), lr_scales=[1.0, 0.5])
    opt = MultiFrequencyOptimizer(model, lambda groups: torch.optim.SGD(groups), lr)
    train(model, opt, batches(7))
    stats = opt.level_stats()
    assert {k: v["updates"] for k, v in stats.items()} == {"outer": 7, "level0": 3, "level1": 2}
    for level, s in stats.items():
        assert torch.is_tensor(s["grad_norm"]) and torch.is_tensor(s["update_norm"])
        assert s["grad_norm"] > 0
        # plain SGD: the update is exactly -lr * lr_scale * (summed gradient)
        torch.testing.assert_close(s["update_norm"], lr * opt.levels[level].lr_scale * s["grad_norm"])


def test_level_stats_grad_norm_is_norm_of_summed_gradient():
    model = make_model(periods=(3,))
    ref = copy.deepcopy(model)
    opt = MultiFrequencyOptimizer(model, lambda groups: torch.optim.SGD(groups), 0.1)
    data = batches(3)
    for batch in data:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert opt.level_stats()["level0"]["updates"] == 1

    # reference: the outer layers take plain SGD steps, level0 stays frozen and sums its gradients
    outer = torch.optim.SGD(list(ref[0].parameters()) + list(ref[2].parameters()), lr=0.1)
    summed = [torch.zeros_like(p) for p in ref[4].parameters()]
    for batch in data:
        loss_fn(ref, batch).backward()
        for s, p in zip(summed, ref[4].parameters()):
            s += p.grad
            p.grad = None
        outer.step()
        outer.zero_grad()
    expected = torch.linalg.vector_norm(torch.cat([s.flatten() for s in summed]))
    torch.testing.assert_close(opt.level_stats()["level0"]["grad_norm"], expected)


# ---------------------------------------------------------------- checkpoints

FACTORY_KW = {"m3": {"frequency": 2}, "m3_ema": {"frequency": 2}, "sgd": {"momentum": 0.9},
              "muon": {"adamw_lr": 1e-2}}


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_mid_period_continues_every_schedule(name, accumulation):
    lr, kw = 1e-2, {**FACTORY_KW.get(name, {}), "level_accumulation": accumulation}
    data = batches(8)
    periods = (2, 3)

    model = make_model(periods=periods)
    opt = build_optimizer(model, name, lr, weight_decay=0.01, **kw)
    train(model, opt, data)

    model_a = make_model(periods=periods)
    opt_a = build_optimizer(model_a, name, lr, weight_decay=0.01, **kw)
    train(model_a, opt_a, data[:4])  # step 4: mid-period for the period-3 level
    assert any(a is not None for a in opt_a.accumulators["level1"])
    model_state, opt_state = roundtrip(model_a.state_dict()), roundtrip(opt_a.state_dict())

    model_b = make_model(seed=123, periods=periods)  # a fresh process: different init, no grads
    opt_b = build_optimizer(model_b, name, lr, weight_decay=0.01, **kw)
    model_b.load_state_dict(model_state)
    opt_b.load_state_dict(opt_state)
    assert opt_b.step_count == 4
    train(model_b, opt_b, data[4:])

    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q), (name, accumulation)
    assert {k: v["updates"] for k, v in opt_b.level_stats().items()} == {"outer": 8, "level0": 4, "level1": 2}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_loads_with_weights_only(name, tmp_path):
    model = make_model(periods=(2, 3))
    opt = build_optimizer(model, name, 1e-2, **FACTORY_KW.get(name, {}))
    train(model, opt, batches(5))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert state["step_count"] == 5
    assert set(state["levels"]) == {"outer", "level0", "level1"}


def test_load_rejects_changed_periods():
    model = make_model(periods=(2,))
    opt = build_optimizer(model, "sgd", 0.1)
    state = opt.state_dict()
    other = build_optimizer(make_model(periods=(4,)), "sgd", 0.1)
    with pytest.raises(ValueError, match="period"):
        other.load_state_dict(state)


# ---------------------------------------------------------------- factory

def test_factory_rejects_unknown_names():
    with pytest.raises(ValueError) as err:
        build_optimizer(make_model(), "adam", 1e-3)
    assert "optim.name" in str(err.value) and "m3_ema" in str(err.value)


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("sgd", 5e-2), ("muon", 2e-2), ("m3", 1e-3),
                                     ("m3_ema", 1e-3), ("delta_momentum", 1e-2), ("dmgd", 1e-2), ("dgd", 5e-2)])
def test_every_optimizer_reduces_a_regression_loss(name, lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    tag(model[2], LevelSpec("slow", 2))
    x = torch.randn(64, 8)
    y = torch.tanh(x @ torch.randn(8, 4))
    opt = build_optimizer(model, name, lr, **({"adamw_lr": 1e-2} if name in ("muon", "m3", "m3_ema") else {}))
    first = ((model(x) - y) ** 2).mean().item()
    for _ in range(60):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    last = ((model(x) - y) ** 2).mean().item()
    assert last < 0.7 * first, (name, first, last)


# ---------------------------------------------------------------- Newton–Schulz and Muon

def ns_reference(G, steps=5, coefficients=(3.4445, -4.7750, 2.0315)):
    """Newton–Schulz through the SVD: the iteration applies a s + b s^3 + c s^5 to each singular value."""
    a, b, c = coefficients
    G = G.double()
    norm = torch.linalg.matrix_norm(G, keepdim=True)
    if float(norm.max()) == 0:
        return torch.zeros_like(G)
    U, S, Vh = torch.linalg.svd(G / (norm + 1e-7), full_matrices=False)
    for _ in range(steps):
        S = a * S + b * S ** 3 + c * S ** 5
    return U @ torch.diag_embed(S) @ Vh


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9), (3, 10, 6)])
def test_newton_schulz_matches_svd_reference(shape):
    G = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(G, dtype=torch.float64), ns_reference(G), rtol=1e-9, atol=1e-9)
    cubic = (1.5, -0.5, 0.0)
    torch.testing.assert_close(newton_schulz(G, steps=8, coefficients=cubic, dtype=torch.float64),
                               ns_reference(G, steps=8, coefficients=cubic), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (40, 40)])
def test_newton_schulz_is_near_orthogonal(shape, dtype):
    torch.manual_seed(0)
    G = torch.randn(*shape) + 0.1  # a common offset: one large singular value, the rest much smaller
    O = newton_schulz(G, dtype=dtype)
    assert O.dtype == G.dtype and O.shape == G.shape
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())


def test_muon_param_groups_route_embeddings_heads_and_vectors_to_adamw():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.body = nn.Linear(6, 6)
            self.norm = nn.LayerNorm(6)
            self.head = nn.Linear(6, 10)

    net = Net()
    groups = muon_param_groups(net)
    ortho = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    assert ortho == {id(net.body.weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="not 2-D"):
        Muon([{"params": [net.body.bias], "use_muon": True}])


@pytest.mark.parametrize("cls", [Muon, M3, M3Stabilized])
def test_fallback_half_is_adamw(cls):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(7))
    q = nn.Parameter(p.detach().clone())
    opt = cls([{"params": [p], "use_muon": False}], adamw_lr=1e-2, adamw_betas=(0.9, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW([q], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(7)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_a_handwritten_loop(nesterov):
    torch.manual_seed(0)
    W0 = torch.randn(6, 3, dtype=torch.float64)
    p = nn.Parameter(W0.clone())
    lr, mu = 0.05, 0.9
    opt = Muon([p], lr=lr, momentum=mu, nesterov=nesterov, ns_dtype=torch.float64)
    W, buf = W0.clone(), torch.zeros_like(W0)
    for _ in range(3):
        g = torch.randn(6, 3, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        buf = mu * buf + g
        W = W - lr * (6 / 3) ** 0.5 * ns_reference(g + mu * buf if nesterov else buf)
    torch.testing.assert_close(p.detach(), W, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- M3

def m3_reference(W, grads, f, lr, b1, b2, b3, alpha, eps, ema=False):
    """Algorithm 1 written as in the paper: an outer loop over chunks k, an inner loop over steps."""
    M1, V, M2 = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(W)
    previous_chunk, t, chunks = [], 0, 0
    for k in range(len(grads) // f):
        if previous_chunk:
            chunks += 1
            if ema:
                M2 = b3 * M2 + (1 - b3) * sum(previous_chunk) / f
                O2 = ns_reference(M2 / (1 - b3 ** chunks))
            else:
                M2 = M2 + b3 * sum(previous_chunk)
                O2 = ns_reference(M2)
        else:
            O2 = torch.zeros_like(W)
        chunk = []
        for _ in range(f):
            g = grads[t]
            t += 1
            chunk.append(g)
            if ema:
                M1 = b1 * M1 + (1 - b1) * g
                V = b2 * V + (1 - b2) * g ** 2
                O1 = ns_reference(M1 / (1 - b1 ** t))
                W = W - lr * (O1 + alpha * O2) / ((V / (1 - b2 ** t)).sqrt() + eps)
            else:
                M1 = M1 + b1 * g
                V = V + b2 * g ** 2
                O1 = ns_reference(M1)
                W = W - lr * (O1 + alpha * O2) / (V.sqrt() + eps)
        previous_chunk = chunk
    return W


@pytest.mark.parametrize("variant", ["literal", "ema"])
def test_m3_matches_algorithm_1(variant):
    torch.manual_seed(0)
    f, lr, betas, alpha, eps = 3, 0.01, (0.9, 0.99, 0.8), 0.7, 1e-8
    W0 = torch.randn(3, 4, dtype=torch.float64)
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3 * f)]
    p = nn.Parameter(W0.clone())
    opt = M3([p], lr=lr, betas=betas, alpha=alpha, frequency=f, eps=eps, variant=variant,
             ns_dtype=torch.float64)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = m3_reference(W0, grads, f, lr, *betas, alpha, eps, ema=variant == "ema")
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- delta momentum, DMGD, DGD

@pytest.mark.parametrize("shape", [(2, 3), (4, 2), (5,)])
def test_delta_momentum_worked_example(shape):
    torch.manual_seed(0)
    lr, alpha = 0.1, 0.9
    W0 = torch.randn(*shape, dtype=torch.float64)
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    p = nn.Parameter(W0.clone())
    opt = DeltaMomentum([p], lr=lr, alpha=alpha)
    W, m = W0.clone(), torch.zeros_like(W0)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        # Eq. 49 on the (out, in) view: m <- m (alpha I - g_hat^T g_hat) - lr g, g_hat = g / ||g||_F
        G = g.reshape(1, -1) if g.ndim == 1 else g
        G_hat = G / G.norm()
        M = m.reshape(G.shape)
        M = M @ (alpha * torch.eye(G.shape[1], dtype=G.dtype) - G_hat.T @ G_hat) - lr * G
        m = M.reshape(shape)
        W = W + m
    torch.testing.assert_close(p.detach(), W, rtol=1e-12, atol=1e-12)


def test_delta_momentum_overwrites_memory_along_the_gradient_input():
    # rank-1 gradient u x^T with alpha = 1: the momentum's old content along x is replaced by -lr g x
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    opt = DeltaMomentum([p], lr=0.5, alpha=1.0)
    p.grad = torch.randn(3, 4, dtype=torch.float64)
    opt.step()
    u, x = torch.randn(3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    g = torch.outer(u, x)
    p.grad = g
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum"] @ x, -0.5 * g @ x)


def test_dmgd_worked_example_against_autograd():
    torch.manual_seed(0)
    lr, alpha, memory_lr, hidden = 0.1, 0.8, 0.05, 4
    W0 = torch.randn(3, 2, dtype=torch.float64)
    p = nn.Parameter(W0.clone())
    opt = DMGD([p], lr=lr, alpha=alpha, hidden=hidden, memory_lr=memory_lr)
    # the memory, written with autograd: m(u) = b + tanh(u w_in + c) @ w_out, L = <m(u), g>
    b = torch.zeros(6, dtype=torch.float64)
    w_in = torch.linspace(-2, 2, hidden, dtype=torch.float64)
    c = torch.linspace(-1, 1, hidden, dtype=torch.float64).flip(0)
    w_out = torch.zeros(hidden, dtype=torch.float64)
    W = W0.clone()
    for _ in range(3):
        g = torch.randn(3, 2, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()

        gf = g.flatten()
        u = gf / gf.pow(2).mean().sqrt()
        theta = [t.clone().requires_grad_() for t in (w_in, c, w_out)]
        out = torch.tanh(u[:, None] * theta[0] + theta[1]) @ theta[2]
        d_w_in, d_c, d_w_out = torch.autograd.grad((out * gf).mean(), theta)
        b = alpha * b - lr * gf  # d<b, g>/db = g
        w_out = alpha * w_out - memory_lr * d_w_out
        w_in = w_in - memory_lr * d_w_in
        c = c - memory_lr * d_c
        W = W + (b + torch.tanh(u[:, None] * w_in + c) @ w_out).reshape(3, 2)
    torch.testing.assert_close(p.detach(), W, rtol=1e-10, atol=1e-12)


def test_dmgd_without_memory_learning_is_heavy_ball_momentum():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3))
    q = nn.Parameter(p.detach().clone())
    opt = DMGD([p], lr=0.1, alpha=0.9, memory_lr=0.0)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for _ in range(5):
        g = torch.randn(4, 3)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q)


def test_dgd_outer_worked_example():
    torch.manual_seed(0)
    lr = 0.3
    layer = nn.Linear(3, 2).double()
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = DGDOuter(layer.parameters(), lr=lr, model=layer)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        layer(torch.randn(4, 3, dtype=torch.float64) * 100)  # evaluation forwards are ignored
    ((layer(x) - y) ** 2).sum().backward()
    grad_W, grad_b = layer.weight.grad.clone(), layer.bias.grad.clone()
    opt.step()

    x_bar = (x / x.norm(dim=1, keepdim=True)).mean(0)
    eta = lr / (1 + lr * x_bar @ x_bar)
    expected_W = W0 @ (torch.eye(3, dtype=torch.float64) - eta * torch.outer(x_bar, x_bar)) - eta * grad_W
    torch.testing.assert_close(layer.weight.detach(), expected_W)
    torch.testing.assert_close(layer.bias.detach(), b0 - lr * grad_b)  # not a Linear input: plain GD
    assert "x_sum" not in opt.state[layer.weight]  # the input record starts afresh after the step


def test_dgd_update_solves_the_proximal_regression():
    # Eq. 56: W+ = argmin 1/2 ||W x - u||^2 + 1/(2 lr) ||W - W_t||^2 with u = -dL/dy, grad = dL/dy x^T
    torch.manual_seed(0)
    lr = 0.7
    W = torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    dy = torch.randn(3, dtype=torch.float64)
    u = -dy
    # stationarity: (W x - u) x^T + (W - W_t) / lr = 0  =>  W (x x^T + I / lr) = u x^T + W_t / lr
    A = torch.outer(x, x) + torch.eye(5, dtype=torch.float64) / lr
    expected = torch.linalg.solve(A, (torch.outer(u, x) + W / lr).T, left=True).T
    torch.testing.assert_close(dgd_update(W, torch.outer(dy, x), x, lr), expected)


def test_dgd_outer_averages_inputs_over_the_period_of_a_slow_level():
    torch.manual_seed(0)
    lr = 0.2
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    tag(model[0], LevelSpec("slow", 2))
    opt = build_optimizer(model, "dgd", lr)
    W0 = model[0].weight.detach().clone()
    xs = [torch.randn(5, 3, dtype=torch.float64) for _ in range(2)]
    grad_sum = torch.zeros_like(W0)
    for x in xs:
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    W0_ = W0.clone().requires_grad_()
    for x in xs:  # the weight did not move inside the period: the gradients are at W0
        grad_sum += torch.autograd.grad((x @ W0_.T).pow(2).sum(), W0_)[0]
    x_bar = sum((x / x.norm(dim=1, keepdim=True)).mean(0) for x in xs) / 2
    eta = lr / (1 + lr * x_bar @ x_bar)
    expected = W0 - eta * torch.outer(W0 @ x_bar, x_bar) - eta * grad_sum
    torch.testing.assert_close(model[0].weight.detach(), expected)


def test_m3_stabilized_is_m3_with_ema_moments():
    """m3_ema builds M3Stabilized: its steps are M3(variant="ema")'s exactly, and not the literal's."""
    torch.manual_seed(0)
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(6)]
    W0 = torch.randn(3, 4, dtype=torch.float64)
    out = {}
    for name, make in (("stabilized", lambda p: M3Stabilized([p], lr=0.01, frequency=2, ns_dtype=torch.float64)),
                       ("ema", lambda p: M3([p], lr=0.01, frequency=2, variant="ema", ns_dtype=torch.float64)),
                       ("literal", lambda p: M3([p], lr=0.01, frequency=2, variant="literal", ns_dtype=torch.float64))):
        p = nn.Parameter(W0.clone())
        opt = make(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[name] = p.detach()
    torch.testing.assert_close(out["stabilized"], out["ema"], rtol=0, atol=0)
    assert not torch.allclose(out["stabilized"], out["literal"])
