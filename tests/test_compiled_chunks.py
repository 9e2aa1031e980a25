"""`model.memory.compile`: the self-modifying Titans and Titans (MLP memory) chunk steps through
torch.compile give eager's numbers (float32 rounding), fall back to eager where compiling fails, and
the shifted-product depthwise convolution equals conv1d."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from nlcl.models import memory as mem
from nlcl.models import self_modifying_titans as smt
from nlcl.models.self_modifying_titans import SelfModifyingTitans, SelfModifyingTitansConfig


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("width", [1, 2, 4, 7])
def test_causal_depthwise_conv_equals_conv1d(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, 11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 1, width, generator=g, dtype=torch.float64, requires_grad=True)
    ours = smt.causal_depthwise_conv(x, w)
    conv = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), w, groups=5).transpose(1, 2)
    assert rel_err(ours, conv) < 1e-14
    probe = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((ours * probe).sum(), (x, w), retain_graph=True)
    gb = torch.autograd.grad((conv * probe).sum(), (x, w))
    assert all(rel_err(a, b) < 1e-13 for a, b in zip(ga, gb))
    # causal: the output at t does not depend on later inputs
    assert torch.autograd.grad(ours[:, 3].sum(), x)[0][:, 4:].abs().sum() == 0


def test_titans_conv_is_its_conv1d_module():
    """Titans keeps its nn.Conv1d (the checkpoint's parameter) and computes it as shifted products."""
    from nlcl.models.titans import Titans, TitansConfig

    torch.manual_seed(0)
    layer = Titans(TitansConfig(d_model=16, n_heads=2)).double()
    qkv = torch.randn(2, 9, layer.conv.in_channels, dtype=torch.float64)
    expected = layer.conv(qkv.transpose(1, 2))[..., :9].transpose(1, 2)
    assert rel_err(smt.causal_depthwise_conv(qkv, layer.conv.weight), expected) < 1e-14


def pair(**overrides):
    torch.manual_seed(0)
    cfg = dict(d_model=16, n_heads=2) | overrides
    eager = SelfModifyingTitans(SelfModifyingTitansConfig(**cfg))
    compiled = SelfModifyingTitans(SelfModifyingTitansConfig(**cfg, compile=True))
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def outputs_and_grads(layer, x, w):
    y = layer(x)
    return y, torch.autograd.grad((y * w).sum(), list(layer.parameters()), allow_unused=True)


def test_compiled_chunks_equal_eager_in_float32(monkeypatch):
    """T = 40: generation chunks of 8 (four compiled, the last one eager), main-memory chunks of 16
    (two compiled, a ragged 8 eager), one backward-window cut at 32 tokens; every output and every
    parameter's gradient within float32 rounding of eager."""
    monkeypatch.setattr(mem, "_COMPILED", {})
    monkeypatch.setattr(mem, "_COMPILE_FAILED", [])
    eager, compiled = pair(backward_window=32)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    y_e, g_e = outputs_and_grads(eager, x, w)
    y_c, g_c = outputs_and_grads(compiled, x, w)
    assert mem._COMPILE_FAILED == []
    assert set(mem._COMPILED) == {SelfModifyingTitans.memory_inputs, smt.generation_chunk,
                                 smt.main_memory_chunk}  # inputs and both phases went through it
    assert rel_err(y_c, y_e) < 1e-5
    names = [n for n, _ in eager.named_parameters()]
    errors = {n: rel_err(c, e) for n, c, e in zip(names, g_c, g_e) if e is not None and e.norm() > 0}
    assert len(errors) >= 15 and max(errors.values()) < 1e-4, errors
    # evaluation (no grad) stays eager: the same values, no new compiled function
    with torch.no_grad():
        assert rel_err(compiled(x), y_e) < 1e-5


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setattr(mem, "_COMPILED", {})
    monkeypatch.setattr(mem, "_COMPILE_FAILED", [])

    def broken_compile(fn, **_):
        def run(*args):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager, compiled = pair()
    x = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = compiled(x)
    messages = [str(c.message) for c in caught if "model.memory.compile" in str(c.message)]
    assert len(messages) == 1 and "no C++ compiler here" in messages[0]
    assert rel_err(y, eager(x)) < 1e-6


def test_titans_compiled_chunks_equal_eager_in_float32(monkeypatch):
    """Titans' MLP memory at chunk 16 on T = 40 (three chunks, the last padded): the compiled inputs,
    decay tables and chunk steps give outputs and every parameter's gradient within float32 rounding
    of eager; evaluation stays eager."""
    from nlcl.models.titans import Titans, TitansConfig

    monkeypatch.setattr(mem, "_COMPILED", {})
    monkeypatch.setattr(mem, "_COMPILE_FAILED", [])
    torch.manual_seed(0)
    eager = Titans(TitansConfig(d_model=16, n_heads=2, chunk_size=16))
    compiled = Titans(TitansConfig(d_model=16, n_heads=2, chunk_size=16, compile=True))
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    y_e, g_e = outputs_and_grads(eager, x, w)
    y_c, g_c = outputs_and_grads(compiled, x, w)
    assert mem._COMPILE_FAILED == []
    assert set(mem._COMPILED) == {Titans.memory_inputs, mem._retention_fields, mem.mlp_memory_chunk}
    assert rel_err(y_c, y_e) < 1e-5
    names = [n for n, _ in eager.named_parameters()]
    errors = {n: rel_err(c, e) for n, c, e in zip(names, g_c, g_e) if e is not None and e.norm() > 0}
    assert len(errors) >= 5 and max(errors.values()) < 1e-4, errors
    with torch.no_grad():
        assert rel_err(compiled(x), y_e) < 1e-5


def test_compile_flag_is_validated():
    from nlcl.models.titans import TitansConfig

    with pytest.raises(ValueError, match="model.memory.compile"):
        SelfModifyingTitansConfig(compile="yes")
    with pytest.raises(ValueError, match="model.memory.compile"):
        TitansConfig(d_model=16, n_heads=2, compile="yes")
