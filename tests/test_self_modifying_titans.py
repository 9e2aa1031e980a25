"""Self-modifying Titans: chunk-parallel form vs the token-by-token reference, DGD, causality,
gradients, ablation switches, and a tiny copy task."""
import itertools
import math

import pytest
import torch

from nlcl.models.self_modifying_titans import (
    SelfModifyingTitans,
    SelfModifyingTitansConfig,
    InContextMemory,
    activation_and_derivative,
    chunk_decay,
    dgd_closed_form,
    fast_matrix_chunk,
    inner_gradients,
    memory_forward,
    reference_forward,
)

D, H, T = 16, 2, 13


@pytest.fixture(autouse=True)
def _one_thread():
    # many small ops: a second thread only adds contention on a shared 2-core machine
    torch.set_num_threads(1)
    yield


def make_layer(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    cfg = SelfModifyingTitansConfig(**(dict(d_model=D, n_heads=H, eta_init=0.2) | overrides))
    return SelfModifyingTitans(cfg).to(dtype)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def inputs(batch=2, length=T, seed=1, dtype=torch.float64):
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- chunk-parallel == sequential reference ----------------------------------------------------

CHUNKS = [(4, 3), (1, 1), (5, 16), (16, 2)]  # (memory, other): ragged, token-wise, >= T, mixed


@pytest.mark.parametrize(
    "chunks,objective,rule,momentum",
    list(itertools.product(CHUNKS, ["l2", "dot"], ["dgd", "gd"], [0.0, 0.6])),
)
def test_chunk_parallel_equals_sequential(chunks, objective, rule, momentum):
    layer = make_layer(
        chunk_size_memory=chunks[0], chunk_size_other=chunks[1],
        inner_objective=objective, update_rule=rule, momentum=momentum,
    )
    x = inputs()
    assert rel_err(layer(x), reference_forward(layer, x)) < 1e-10


@pytest.mark.parametrize(
    "switches",
    [
        dict(adaptive_q=True),
        dict(retention=False),
        dict(adaptive_k=False, adaptive_v=False),
        dict(activation="gelu", memory_hidden=12),
    ],
)
def test_chunk_parallel_equals_sequential_switches(switches):
    layer = make_layer(chunk_size_memory=4, chunk_size_other=3, momentum=0.5, **switches)
    x = inputs()
    assert rel_err(layer(x), reference_forward(layer, x)) < 1e-10


def test_outer_gradients_equal_sequential():
    """The writes are differentiable in both forms, and the gradients agree (not just values)."""
    layer = make_layer(chunk_size_memory=4, chunk_size_other=3, momentum=0.5, adaptive_q=True)
    x, w = inputs(), inputs(seed=2)
    params = list(layer.parameters())
    chunked = torch.autograd.grad((layer(x) * w).sum(), params)
    sequential = torch.autograd.grad((reference_forward(layer, x) * w).sum(), params)
    for (name, _), a, b in zip(layer.named_parameters(), chunked, sequential):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_activation_derivative_matches_autograd(name):
    z = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    s, ds = activation_and_derivative(z, name)
    (auto,) = torch.autograd.grad(s.sum(), z)
    assert torch.allclose(ds, auto, atol=1e-12)


@pytest.mark.parametrize(
    "residual,objective,activation",
    list(itertools.product([True, False], ["l2", "dot"], ["silu", "gelu"])),
)
def test_inner_gradients_match_autograd(residual, objective, activation):
    """The rank-1 factors e h^T, g k^T, e equal autograd's gradient of the inner loss at the state,
    with the self-generated target v_hat = M(v) held constant."""
    torch.manual_seed(0)
    mem = InContextMemory(heads=3, dim=6, hidden=5, residual=residual, bias_init=0.7).double()
    state = mem.initial_state(batch=2, momentum=False)
    C = 4
    k = torch.nn.functional.normalize(torch.randn(6, C, 6, dtype=torch.float64), dim=-1)
    v = torch.randn(6, C, 6, dtype=torch.float64)
    e, g, h = inner_gradients(state, k, v, objective, activation)
    for t in range(C):
        leaves = [p.detach().requires_grad_() for p in (state.w1, state.w2, state.b) if p is not None]
        leaf_state = state._replace(w1=leaves[0], w2=leaves[1], b=leaves[2] if len(leaves) > 2 else None)
        v_hat = memory_forward(state, v[:, t : t + 1], activation)[0].detach()
        pred = memory_forward(leaf_state, k[:, t : t + 1], activation)[0]
        loss = 0.5 * (pred - v_hat).square().sum() if objective == "l2" else -(pred * v_hat).sum()
        grads = torch.autograd.grad(loss, leaves)
        assert torch.allclose(grads[0], torch.einsum("no,nh->noh", e[:, t], h[:, t]), atol=1e-12)
        assert torch.allclose(grads[1], torch.einsum("nh,ni->nhi", g[:, t], k[:, t]), atol=1e-12)
        if not residual:
            assert torch.allclose(grads[2], e[:, t, :, None], atol=1e-12)


# --- DGD: closed form == proximal l2 step ------------------------------------------------------


@pytest.mark.parametrize("eta", [0.1, 1.0, 7.0])
def test_dgd_closed_form_is_the_proximal_solve(eta):
    g = torch.Generator().manual_seed(0)
    dout, din = 5, 7
    W = torch.randn(dout, din, generator=g, dtype=torch.float64)
    x = torch.randn(din, generator=g, dtype=torch.float64)
    x = x / x.norm()
    u = torch.randn(dout, generator=g, dtype=torch.float64)
    # argmin_W' 1/2 ||W' x - u||^2 + 1/(2 eta) ||W' - W||^2  <=>  W' (x x^T + I/eta) = u x^T + W/eta
    A = torch.outer(x, x) + torch.eye(din, dtype=torch.float64) / eta
    prox = torch.linalg.solve(A, (torch.outer(u, x) + W / eta).T).T  # A is symmetric
    assert torch.allclose(dgd_closed_form(W, x, u, eta), prox, atol=1e-12)

    # the layer's write machinery, one token with alpha = 1, erase = eta' and gradient -u x^T
    eta_p = torch.full((1, 1), eta / (1 + eta), dtype=torch.float64)
    decay = chunk_decay(torch.zeros(1, 1, dtype=torch.float64), beta=0.0)
    W1, _, _ = fast_matrix_chunk(W[None], None, x[None, None], -u[None, None], eta_p, decay, erase=eta_p)
    assert torch.allclose(W1[0], prox, atol=1e-12)


# --- causality, batch independence ------------------------------------------------------------


@pytest.mark.parametrize("t0", [0, 4, 6, 11])
def test_causal(t0):
    layer = make_layer(chunk_size_memory=5, chunk_size_other=3, momentum=0.5, adaptive_q=True)
    x = inputs()
    x2 = x.clone()
    x2[:, t0 + 1 :] += torch.randn_like(x2[:, t0 + 1 :])
    y, y2 = layer(x), layer(x2)
    assert torch.allclose(y[:, : t0 + 1], y2[:, : t0 + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(y[:, t0 + 1 :], y2[:, t0 + 1 :])


def test_batch_independent():
    layer = make_layer(chunk_size_memory=4, chunk_size_other=3)
    x = inputs(batch=3)
    x2 = x.clone()
    x2[1] += torch.randn_like(x2[1])
    y, y2 = layer(x), layer(x2)
    assert torch.allclose(y[[0, 2]], y2[[0, 2]], rtol=0, atol=1e-12)
    assert not torch.allclose(y[1], y2[1])
    # and each sequence alone gives the same answer: fast weights are never shared
    assert torch.allclose(layer(x[2:3]), y[2:3], rtol=0, atol=1e-12)


# --- every generator learns ---------------------------------------------------------------------


@pytest.mark.parametrize("switches", [dict(), dict(adaptive_q=True, momentum=0.5)])
def test_every_parameter_gets_a_gradient(switches):
    layer = make_layer(dtype=torch.float32, chunk_size_memory=4, chunk_size_other=4, **switches)
    x = inputs(length=16, dtype=torch.float32)
    layer(x).square().mean().backward()
    names = dict(layer.named_parameters())
    for group in ["memories.k.", "memories.v.", "memories.eta.", "memories.alpha.", "memories.memory."]:
        assert any(n.startswith(group) for n in names)
    for name, p in names.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


# --- ablation switches: each changes what it names and nothing else -----------------------------


def pair(**switch):
    """Default layer and switched layer with identical shared weights."""
    base = make_layer(chunk_size_memory=4, chunk_size_other=3)
    other = make_layer(seed=5, chunk_size_memory=4, chunk_size_other=3, **switch)
    missing, unexpected = other.load_state_dict(base.state_dict(), strict=False)
    return base, other, set(missing), set(unexpected)


def memory_params(name):
    return {f"memories.{name}.w1", f"memories.{name}.w2"}


@pytest.mark.parametrize(
    "switch,first_changed_output",
    [
        (dict(update_rule="gd"), 1),  # changes the writes: first write is read at token 1
        (dict(inner_objective="dot"), 1),
        (dict(momentum=0.6), 2),  # S_1 = -eta G_1 either way: first difference after two writes
    ],
)
def test_update_switches_change_only_the_writes(switch, first_changed_output):
    base, other, missing, unexpected = pair(**switch)
    assert not missing and not unexpected  # same parameter set
    x = inputs()
    gb, go = base.generate(x), other.generate(x)
    for a, b in zip(gb, go):  # generation inside the first chunk reads only the initial states
        assert torch.equal(a[:, :3], b[:, :3])
    yb, yo = base(x), other(x)
    assert torch.allclose(yb[:, :first_changed_output], yo[:, :first_changed_output], rtol=0, atol=1e-13)
    assert not torch.allclose(yb[:, first_changed_output], yo[:, first_changed_output])


def test_retention_off_sets_alpha_to_one_and_keeps_parameters():
    base, other, missing, unexpected = pair(retention=False)
    assert not missing and not unexpected
    x = inputs()
    gen = other.generate(x)
    assert torch.equal(gen.log_alpha, torch.zeros_like(gen.log_alpha))  # alpha == 1 exactly
    assert (base.generate(x).log_alpha < 0).all()
    assert not torch.allclose(base(x)[:, 1:], other(x)[:, 1:])


@pytest.mark.parametrize("path", ["k", "v", "q"])
def test_adaptive_projection_switch(path):
    default_on = path in ("k", "v")
    base, other, missing, unexpected = pair(**{f"adaptive_{path}": not default_on})
    # exactly that memory's initial state appears or disappears
    assert (unexpected if default_on else missing) == memory_params(path)
    assert not (missing if default_on else unexpected)
    x = inputs()
    u = dict(zip("qkv", base.memory_inputs(x)))
    static, adaptive = (other, base) if default_on else (base, other)
    gen_static, gen_adaptive = static.generate(x), adaptive.generate(x)
    expected = u[path] if path == "v" else torch.nn.functional.normalize(u[path], dim=-1, eps=1e-6)
    got = getattr(gen_static, path)
    assert torch.allclose(got, expected, rtol=0, atol=1e-14)  # static: the projection itself
    assert not torch.allclose(getattr(gen_adaptive, path), expected)
    # the other projections' inputs are untouched by the switch
    for a, b in zip(static.memory_inputs(x), adaptive.memory_inputs(x)):
        assert torch.equal(a, b)


def test_eta_and_alpha_start_near_their_init():
    layer = make_layer(dtype=torch.float32, eta_init=0.05, alpha_init=0.99)
    gen = layer.generate(inputs(dtype=torch.float32))
    alpha = gen.log_alpha.exp()
    assert (gen.eta > 0).all() and gen.eta.max() < 0.2 and abs(gen.eta.mean().item() - 0.05) < 0.03
    assert (alpha < 1).all() and alpha.min() > 0.95


@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_defaults_stay_bounded_on_long_random_input(objective):
    torch.manual_seed(0)
    layer = SelfModifyingTitans(SelfModifyingTitansConfig(d_model=64, n_heads=2, inner_objective=objective))
    with torch.no_grad():
        y = layer(torch.randn(1, 1024, 64))
    assert torch.isfinite(y).all() and y.abs().max() < 10


# --- a tiny model learns to copy -----------------------------------------------------------------


def test_tiny_model_learns_to_copy_in_context():
    """Embedding -> self-modifying Titans (residual) -> linear head, on `a1..a8 SEP a1..a8` with
    fresh random sequences every step, judged on held-out sequences: the copy can only come from
    the in-context memory (an induction step: the short convolution puts the previous token in k)."""
    torch.manual_seed(0)
    vocab, n, d = 12, 8, 32

    def batch(size):
        first = torch.stack([torch.randperm(vocab)[:n] for _ in range(size)])
        seq = torch.cat([first, torch.full((size, 1), vocab), first], dim=1)  # vocab = SEP
        return seq[:, :-1], seq[:, 1:]

    cfg = SelfModifyingTitansConfig(d_model=d, n_heads=2, chunk_size_memory=8, chunk_size_other=8, eta_init=0.2)
    embed, mixer = torch.nn.Embedding(vocab + 1, d), SelfModifyingTitans(cfg)
    head = torch.nn.Linear(d, vocab + 1)
    opt = torch.optim.Adam([*embed.parameters(), *mixer.parameters(), *head.parameters()], lr=1e-2)

    def loss_and_accuracy(x, y):
        h = embed(x)
        logits = head(h + mixer(h))[:, n:]  # predictions of the copied half
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, n:].flatten())
        return loss, (logits.argmax(-1) == y[:, n:]).float().mean().item()

    held_out = batch(256)
    _, acc_before = loss_and_accuracy(*held_out)
    for _ in range(250):
        loss, _ = loss_and_accuracy(*batch(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss, acc = loss_and_accuracy(*held_out)
    assert acc_before < 0.3 and acc > 0.9, (acc_before, acc, loss.item())
