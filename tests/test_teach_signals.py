"""Teach signals of in-context CMS levels are exact for every block, not only the last one.

The literal Eq. 71 step of chunk c is the gradient of chunk c's own summed task loss with respect to
the weights that chunk c reads. The reference below gives chunk c's tokens their own copy W_c of a
level's weights (every other token reads a detached copy), so autograd returns exactly that
gradient; the level's write from its teach signals must equal it, for a level below a mixer too.
"""
import pytest
import torch
import torch.nn.functional as F

from nlcl.models.hope import HopeBackbone, HopeConfig
from nlcl.models.incontext import IGNORE, InContextLM, teach_signals, token_levels, two_pass_forward

V, C, T = 30, 4, 12


def lm(family="hope_attention", seed=0):
    torch.manual_seed(seed)
    bb = HopeBackbone(HopeConfig(family=family, vocab_size=V, d_model=16, n_layers=2, n_heads=2,
                                 cms=dict(periods=[C, 1], units=["token", "step"], inner_lr=[0.5, 0.0], hidden=32)))
    return InContextLM(bb, V).double()


def chunk_gradient(model, level, ids, targets, c):
    """d (summed loss of chunk c) / d W_c, with W_c read by chunk c's tokens only (at the meta state)."""
    own = [p.detach().clone().requires_grad_() for p in level.fast_params()]
    mlp = level.mlp

    def read_own_copy(module, args, out):
        x = args[0]
        mine = F.linear(F.gelu(F.linear(x, own[0], own[1])), own[2], own[3])
        mask = torch.zeros(x.shape[:2] + (1,), dtype=torch.bool)
        mask[:, c * C:(c + 1) * C] = True
        return torch.where(mask, mine, out.detach())

    handle = mlp.register_forward_hook(read_own_copy)
    try:
        logits = model.lm_head(model.backbone(ids))
    finally:
        handle.remove()
    chunk_targets = torch.full_like(targets, IGNORE)
    chunk_targets[:, c * C:(c + 1) * C] = targets[:, c * C:(c + 1) * C]
    loss = F.cross_entropy(logits.flatten(0, 1), chunk_targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return torch.autograd.grad(loss, own)


def write_from_signals(level, ids_in, delta, c):
    """sum over chunk c of grad_W <level output_t(W), delta_t>: what the level's chunk step uses."""
    params = [p.detach().clone().requires_grad_() for p in level.fast_params()]
    x = ids_in[:, c * C:(c + 1) * C]
    out = F.linear(F.gelu(F.linear(x, params[0], params[1])), params[2], params[3])
    return torch.autograd.grad((out * delta[:, c * C:(c + 1) * C]).sum(), params)


def level_inputs(model, ids):
    """The normalised input each token level's MLP sees in a plain forward at the meta state."""
    seen = {}
    hooks = [lv.mlp.register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(k, a[0].detach()))
             for k, lv in enumerate(token_levels(model))]
    with torch.no_grad():
        model.lm_head(model.backbone(ids))
    for h in hooks:
        h.remove()
    return [seen[k] for k in range(len(hooks))]


def cosine(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("family", ["hope_attention", "hope"])
def test_the_write_of_a_level_below_a_mixer_is_the_literal_chunk_gradient(family):
    model = lm(family)
    torch.manual_seed(1)
    ids, targets = torch.randint(1, V, (2, T)), torch.randint(0, V, (2, T))
    levels = token_levels(model)
    assert len(levels) == 2  # block 0 (below block 1's mixer) and block 1 (the last)
    inputs = level_inputs(model, ids)
    exact = teach_signals(model, ids, targets)
    frozen = teach_signals(model, ids, targets, exact=False)
    for c in (0, 1):  # the chunks whose writes later chunks read
        for k, level in enumerate(levels):
            literal = chunk_gradient(model, level, ids, targets, c)
            got = write_from_signals(level, inputs[k], exact[k], c)
            for g, r in zip(got, literal):
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
            if k == 0:  # the cheaper constant-mixer signals miss block 1's mixer: not the gradient
                assert cosine(write_from_signals(level, inputs[k], frozen[k], c), literal) < 0.999


def test_exact_signals_keep_pass_two_causal():
    model = lm()
    torch.manual_seed(2)
    ids, targets = torch.randint(1, V, (1, T)), torch.randint(0, V, (1, T))
    out = two_pass_forward(model, ids, targets)
    changed = targets.clone()
    changed[:, 2 * C:] = (targets[:, 2 * C:] + 1) % V  # chunk 2's targets: no earlier output may see them
    out2 = two_pass_forward(model, ids, changed)
    torch.testing.assert_close(out2[:, :2 * C], out[:, :2 * C], rtol=1e-12, atol=1e-12)
    changed[:, C:2 * C] = (targets[:, C:2 * C] + 1) % V  # chunk 1's targets reach chunk 2 only
    out3 = two_pass_forward(model, ids, changed)
    torch.testing.assert_close(out3[:, :2 * C], out[:, :2 * C], rtol=1e-12, atol=1e-12)
    assert float((out3[:, 2 * C:] - out[:, 2 * C:]).abs().max()) > 1e-6


def test_teach_signals_mode_is_set_from_the_cms_config():
    torch.manual_seed(0)
    bb = HopeBackbone(HopeConfig(family="hope_attention", vocab_size=V, d_model=16, n_layers=2, n_heads=2,
                                 cms=dict(periods=[C], units=["token"], inner_lr=0.5, hidden=32,
                                          teach_signals="frozen_mixers")))
    model = InContextLM(bb, V).double()
    ids, targets = torch.randint(1, V, (1, T)), torch.randint(0, V, (1, T))
    configured = teach_signals(model, ids, targets)
    for a, b in zip(configured, teach_signals(model, ids, targets, exact=False)):
        torch.testing.assert_close(a, b)
    assert float((configured[0] - teach_signals(model, ids, targets, exact=True)[0]).abs().max()) > 1e-8
    with pytest.raises(ValueError, match="model.cms.teach_signals"):
        HopeBackbone(HopeConfig(family="hope_attention", vocab_size=V, d_model=16, n_layers=1, n_heads=2,
                                cms=dict(periods=[C], units=["token"], teach_signals="literal")))
