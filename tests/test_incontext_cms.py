"""In-context (token-unit) CMS levels: chunk-parallel math, two-pass teach signals, causality,
per-sequence fast weights, meta-gradients, and a tiny LM that trains on Tiny Shakespeare."""
import pytest
import torch
import torch.nn.functional as F

from nlcl.levels import OUTER, parameter_levels
from nlcl.models.cms import CMSConfig, fast_mlp_chunked, fast_mlp_reference, gelu_grad
from nlcl.models.heads import SequenceClassifier
from nlcl.models.hope import HopeBackbone, HopeConfig
from nlcl.models.incontext import (IGNORE, InContextLM, has_token_levels, incontext_stats, next_token_targets,
                                   summed_task_loss, teach_signals, token_levels, two_pass_forward)

V = 40


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def mlp_params(d, h, dtype=torch.float64, scale=0.3):
    shapes = [(h, d), (h,), (d, h), (d,)]
    return tuple((scale * torch.randn(s, dtype=dtype)).requires_grad_() for s in shapes)


def lm(periods=(4, 8), units=("token", "step"), inner_lr=0.5, n_layers=2, d=16, family="hope_attention",
       dtype=torch.float64, seed=0, **cms):
    torch.manual_seed(seed)
    bb = HopeBackbone(HopeConfig(family=family, vocab_size=V, d_model=d, n_layers=n_layers, n_heads=2,
                                 cms=dict(periods=list(periods), units=list(units), inner_lr=inner_lr, hidden=32,
                                          **cms)))
    return InContextLM(bb, V).to(dtype)


def plain_logits(model, ids):
    return model.lm_head(model.backbone(ids))


# ---- the chunk math -----------------------------------------------------------------------------

def test_gelu_grad_is_the_derivative_of_torch_gelu():
    z = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.gelu(z).sum(), z)
    assert rel_err(gelu_grad(z.detach()), g) < 1e-13


@pytest.mark.parametrize("T,chunk", [(12, 4), (12, 3), (11, 4), (11, 5), (7, 1), (9, 9)])
def test_chunked_equals_token_reference_outputs_and_meta_gradients(T, chunk):
    torch.manual_seed(T * 10 + chunk)
    B, d, h, lr = 3, 5, 7, 0.4
    params = mlp_params(d, h)
    u = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    teach = torch.randn(B, T, d, dtype=torch.float64)
    fast = fast_mlp_chunked(u, params, teach, chunk, lr)
    ref = fast_mlp_reference(u, params, teach, chunk, lr)
    assert rel_err(fast, ref) < 1e-10
    # outputs really change after the first chunk (the comparison is not vacuous)
    if T > chunk:
        assert rel_err(fast, fast_mlp_chunked(u, params, teach, chunk, 0.0)) > 1e-3
    # meta-gradients through the writes: the reference differentiates its autograd inner steps
    probe = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * probe).sum(), (*params, u))
    g_ref = torch.autograd.grad((ref * probe).sum(), (*params, u))
    for a, b in zip(g_fast, g_ref):
        assert rel_err(a, b) < 1e-10


def test_stop_grad_writes_change_the_meta_gradient_but_not_the_output():
    torch.manual_seed(1)
    params = mlp_params(4, 6)
    u, teach = torch.randn(2, 12, 4, dtype=torch.float64), torch.randn(2, 12, 4, dtype=torch.float64)
    through = fast_mlp_chunked(u, params, teach, 4, 0.5)
    stopped = fast_mlp_chunked(u, params, teach, 4, 0.5, differentiable=False)
    assert torch.equal(through, stopped)
    later = slice(4, None)  # only chunks that read written weights
    g_through = torch.autograd.grad(through[:, later].sum(), params)
    g_stopped = torch.autograd.grad(stopped[:, later].sum(), params)
    # up.weight, up.bias, down.weight learn through the writes; down.bias's write (-lr sum delta)
    # does not depend on any weight, so its gradient is the same either way
    assert all(rel_err(a, b) > 1e-3 for a, b in zip(g_through[:3], g_stopped[:3]))
    assert rel_err(g_through[3], g_stopped[3]) < 1e-14


# ---- the two-pass model ---------------------------------------------------------------------------

def test_config_units_inner_lr_and_levels():
    cfg = CMSConfig(d_model=16, periods=[8, 1, 4], units=["token", "step", "step"], inner_lr=[0.1, 0, 0])
    assert cfg.units == ["token", "step", "step"] and cfg.inner_lr == [0.1, 0.0, 0.0]
    assert CMSConfig(d_model=16, periods=[4, 8], unit="token").units == ["token", "token"]
    for bad in (dict(units=["token"]), dict(units=["token", "epoch"]), dict(inner_lr=[0.1]),
                dict(units=["token", "step"], variant="nested")):
        with pytest.raises(ValueError):
            CMSConfig(d_model=16, periods=[4, 8], **bad)
    model = lm(periods=(8, 1, 4), units=("token", "step", "step"), n_layers=1)
    levels = parameter_levels(model)
    assert levels["backbone.blocks.0.cms.levels.0.mlp.up.weight"] == OUTER  # meta-init: outer optimizer
    assert levels["backbone.blocks.0.cms.levels.2.mlp.up.weight"].period == 4
    assert has_token_levels(model) and len(token_levels(model)) == 1
    assert not has_token_levels(lm(units=("step", "step")))


def test_inner_lr_zero_is_the_plain_forward_exactly():
    model = lm(inner_lr=0.0)
    ids = torch.randint(0, V, (2, 19))
    assert torch.equal(model(ids), plain_logits(model, ids))
    assert all(float(s["write_norm"]) == 0.0 for s in incontext_stats(model).values())
    model = lm(inner_lr=0.5)
    model(ids)
    stats = incontext_stats(model)
    assert len(stats) == 2 and all(float(s["write_norm"]) > 0 for s in stats.values())


@pytest.mark.parametrize("family,variant", [("hope_attention", "sequential"), ("hope_attention", "independent"),
                                            ("hope", "sequential")])
def test_first_write_is_the_chain_rule_gradient_of_the_first_chunks_task_loss(family, variant):
    # one block: the CMS levels reach the loss only along their own positions, so delta is exact
    # and the write after chunk 0 is -inner_lr * grad of chunk 0's summed task loss at the meta state
    C, lr = 4, 0.3
    model = lm(periods=(C, C, 2), units=("token", "token", "step"), inner_lr=lr, n_layers=1, family=family,
               variant=variant)
    ids = torch.randint(0, V, (1, 3 * C))
    out = model(ids)
    targets = next_token_targets(ids)
    levels = token_levels(model)
    params = [p for level in levels for p in level.fast_params()]
    chunk0 = targets.clone()
    chunk0[:, C:] = IGNORE
    grads = torch.autograd.grad(summed_task_loss(plain_logits(model, ids), chunk0), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
        stepped = plain_logits(model, ids)
    assert rel_err(out[:, C:2 * C], stepped[:, C:2 * C]) < 1e-10
    assert rel_err(out[:, :C], stepped[:, :C]) > 1e-4  # chunk 0 read the meta state, not W_1


def test_fast_weights_are_per_sequence_and_reset_every_call():
    model = lm()
    ids = torch.randint(0, V, (3, 21))
    out = model(ids)
    assert torch.equal(model(ids), out)  # nothing persists between calls
    assert all(level.teach is None and level.recorded is None for level in token_levels(model))
    changed = ids.clone()
    changed[1] = torch.randint(0, V, (21,))
    out2 = model(changed)
    assert rel_err(out2[0], out[0]) < 1e-12 and rel_err(out2[2], out[2]) < 1e-12
    assert rel_err(out2[1], out[1]) > 1e-3
    alone = model(ids[:1])  # a sequence's fast weights do not depend on the rest of the batch
    assert rel_err(alone[0], out[0]) < 1e-12


@pytest.mark.parametrize("family", ["hope_attention", "hope"])
def test_pass_two_is_causal(family):
    C, T = 4, 17
    model = lm(periods=(C, 2, 8), units=("token", "token", "step"), family=family, inner_lr=0.5)
    torch.manual_seed(3)
    ids = torch.randint(0, V, (2, T))
    targets = torch.randint(0, V, (2, T))
    out = two_pass_forward(model, ids, targets)
    for end in (C, 2 * C, 2 * C + 1, 3 * C + 2):  # chunk ends and positions inside chunks
        ids2, targets2 = ids.clone(), targets.clone()
        ids2[:, end:] = torch.randint(0, V, (2, T - end))
        targets2[:, end - 1:] = torch.randint(0, V, (2, T - end + 1))  # target of end-1 is token `end`
        out2 = two_pass_forward(model, ids2, targets2)
        assert rel_err(out2[:, :end], out[:, :end]) < 1e-12
        assert rel_err(out2[:, end:], out[:, end:]) > 1e-4
    # in-context learning is at work: later chunks differ from the meta-state forward
    assert rel_err(out[:, C:], plain_logits(model, ids)[:, C:]) > 1e-3


def test_literal_full_backward_teach_signals_would_leak_the_future():
    # the reason the mixers are frozen in pass 1: with attention in the backward, chunk 0's delta
    # carries later tokens' losses, so chunk 1's outputs would depend on chunk 2's targets
    C, T = 4, 12
    model = lm(periods=(C,), units=("token",), n_layers=2)
    ids, targets = torch.randint(0, V, (1, T)), torch.randint(0, V, (1, T))
    targets2 = targets.clone()
    targets2[:, 2 * C:] = (targets[:, 2 * C:] + 1) % V
    leak = [two_pass_forward(model, ids, t, through_mixers=True)[:, C:2 * C] for t in (targets, targets2)]
    assert rel_err(leak[0], leak[1]) > 1e-6
    causal = [two_pass_forward(model, ids, t)[:, C:2 * C] for t in (targets, targets2)]
    assert rel_err(causal[0], causal[1]) < 1e-12


def test_two_pass_forward_through_a_wrapper_module_runs_two_passes_only():
    model = lm()
    wrapper = torch.nn.ModuleDict({"model": model})
    wrapper.forward = lambda ids: model(ids)  # what a host module (e.g. the Learner) does
    ids = torch.randint(0, V, (2, 13))
    calls = []
    handle = model.backbone.register_forward_hook(lambda *a: calls.append(1))
    out = two_pass_forward(wrapper, ids, next_token_targets(ids))
    handle.remove()
    assert len(calls) == 2 and rel_err(out, model(ids)) < 1e-12


def test_context_targets_equal_task_targets_up_to_the_boundary_token_and_eval_matches_training():
    model = lm()
    ids = torch.randint(0, V, (2, 15))
    y = next_token_targets(ids)
    y[:, -1] = torch.randint(0, V, (2,))  # the token after the window: unseen in the context
    trained = two_pass_forward(model, ids, y)
    with torch.no_grad():
        evaluated = model(ids)
    assert rel_err(evaluated, trained.detach()) < 1e-12
    with torch.inference_mode():
        inferred = model(ids.clone())
    assert rel_err(inferred.clone(), trained.detach()) < 1e-12


def test_meta_initial_weights_learn_through_the_writes():
    C = 4
    model = lm(periods=(C,), units=("token",), n_layers=2)
    ids = torch.randint(0, V, (2, 3 * C))
    up = token_levels(model)[1].mlp.up.weight  # second block: its writes depend on the first block too
    grads = {}
    for differentiable in (True, False):
        for level in token_levels(model):
            level.differentiable_writes = differentiable
        out = model(ids)
        loss = F.cross_entropy(out[:, C:].flatten(0, 1), next_token_targets(ids)[:, C:].flatten(), ignore_index=IGNORE)
        (grads[differentiable],) = torch.autograd.grad(loss, up)
    assert grads[True].norm() > 0 and torch.isfinite(grads[True]).all()
    assert rel_err(grads[True], grads[False]) > 1e-3


def test_teach_signals_of_a_classifier_sit_at_the_last_token_only_and_change_nothing():
    torch.manual_seed(0)
    bb = HopeBackbone(HopeConfig(family="hope_attention", vocab_size=V, d_model=16, n_layers=2, n_heads=2,
                                 cms=dict(periods=[2], unit="token", inner_lr=1.0, hidden=32)))
    clf = SequenceClassifier(bb, num_classes=5).double()
    ids = torch.randint(1, V, (3, 10))
    ids[0, 7:] = 0  # right padding
    y = torch.tensor([1, 4, 2])
    deltas = teach_signals(clf, ids, y)
    last = torch.tensor([6, 9, 9])
    for delta in deltas:
        nonzero = delta.abs().sum(-1) > 0
        assert nonzero.sum() == 3 and nonzero[torch.arange(3), last].all()
    assert rel_err(two_pass_forward(clf, ids, y), clf(ids)) < 1e-14


def test_tiny_lm_with_a_token_level_trains_on_tiny_shakespeare():
    from nlcl.streams.data_files import find_data_file

    text = find_data_file("tinyshakespeare", "input.txt").read_text()[:40_000]
    data = torch.tensor(list(text.encode()), dtype=torch.long)
    torch.manual_seed(0)
    bb = HopeBackbone(HopeConfig(family="hope_attention", vocab_size=256, d_model=32, n_layers=1, n_heads=2,
                                 cms=dict(periods=[8, 1], units=["token", "step"], inner_lr=0.05, hidden=64)))
    model = InContextLM(bb, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T, B, losses = 64, 8, []
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        window = torch.stack([data[s:s + T + 1] for s in starts])
        x, y = window[:, :-1], window[:, 1:]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert all(float(s["write_norm"]) > 0 for s in incontext_stats(model).values())  # it learned in context
