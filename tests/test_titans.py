"""Titans neural-memory layer: causality, batch independence, gradients everywhere, it learns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlcl.models.titans import Titans, TitansConfig



@pytest.fixture(autouse=True)
def _one_thread():
    # tiny ops: a second intra-op thread only adds spin-waiting (badly so on a shared, loaded machine)
    torch.set_num_threads(1)

VARIANTS = {
    "mlp": dict(memory="mlp"),
    "linear": dict(memory="linear"),
    "mlp_plain_gd_read_before": dict(memory="mlp", momentum=False, weight_decay=False, read_after_write=False),
    "linear_no_momentum": dict(memory="linear", momentum=False),
}


def make_layer(variant, **kw):
    torch.manual_seed(0)
    cfg = TitansConfig(d_model=16, n_heads=2, chunk_size=8, **{**VARIANTS[variant], **kw})
    return Titans(cfg).double()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal(variant):
    layer = make_layer(variant)
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    y = layer(x)
    t0 = 11   # mid-chunk, and 21 is not a multiple of the chunk size
    x2 = x.clone()
    x2[:, t0:] += torch.randn_like(x2[:, t0:])
    y2 = layer(x2)
    assert y.shape == (2, 21, 16)
    assert torch.allclose(y[:, :t0], y2[:, :t0], atol=1e-12, rtol=0)
    assert (y[:, t0:] - y2[:, t0:]).abs().amax(-1).min() > 1e-6   # every later position feels it


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_independent(variant):
    """Fast weights are per sequence: changing one sample leaves the others unchanged."""
    layer = make_layer(variant)
    x = torch.randn(3, 13, 16, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    y2 = layer(x2)
    assert torch.allclose(y[[0, 2]], y2[[0, 2]], atol=1e-12, rtol=0)
    assert not torch.allclose(y[1], y2[1])
    # and a sample alone gives what it gives inside the batch
    assert torch.allclose(layer(x[2:3]), y[2:3], atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_reaches_every_parameter(variant):
    layer = make_layer(variant)
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    (layer(x) * torch.randn(2, 19, 16, dtype=torch.float64)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gates_learn_through_the_writes():
    """With the read only seeing the initial state's decay, the lr gate would get no gradient;
    a non-zero lr-gate gradient proves the outer gradient flows through the in-context writes."""
    layer = make_layer("mlp")
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    lr_rows = layer.gates.weight.grad[: layer.cfg.n_heads]
    assert lr_rows.abs().sum() > 0


def test_config_validation():
    with pytest.raises(ValueError):
        TitansConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError):
        TitansConfig(memory="attention")


@pytest.mark.parametrize("memory", ["mlp", "linear"])
def test_tiny_model_overfits_tiny_batch(memory):
    torch.manual_seed(0)
    vocab, d, T = 12, 32, 16
    tokens = torch.randint(0, vocab, (4, T + 1))
    model = nn.Sequential(nn.Embedding(vocab, d),
                          Titans(TitansConfig(d_model=d, n_heads=2, chunk_size=8, memory=memory)),
                          nn.Linear(d, vocab))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0            # about log(12) = 2.48 at the start
    assert min(losses[-10:]) < 0.2    # memorised the 64 next-token targets
