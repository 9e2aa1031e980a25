"""The pretrained MiniLM loads offline and becomes a level-stacked classifier."""
import pytest
import torch

from nlcl.levels import parameter_levels
from nlcl.models import build_model
from nlcl.streams.tokenizers import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("minilm")


def test_pretrained_embeddings_are_semantic(tok):
    """Random weights would not rank a paraphrase above an unrelated sentence."""
    model = build_model("minilm", input_kind="tokens", num_classes=3, vocab_size=tok.vocab_size).eval()
    ids = tok.encode_batch(["how much money is in my bank account", "what is my account balance",
                            "play some jazz music in the kitchen"], 16)
    with torch.no_grad():
        f = torch.nn.functional.normalize(model.features(ids), dim=-1)
    assert f[0] @ f[1] > f[0] @ f[2] + 0.2


def test_mlp_blocks_become_levels_with_their_periods(tok):
    model = build_model("minilm", input_kind="tokens", num_classes=3, vocab_size=tok.vocab_size,
                        mlp_periods=[1, 1, 8, 8, 64, 64])
    levels = parameter_levels(model)
    assert levels["encoder.encoder.layer.2.intermediate.dense.weight"].period == 8
    assert levels["encoder.encoder.layer.5.output.dense.weight"].period == 64
    assert levels["encoder.encoder.layer.0.attention.self.query.weight"].period == 1
    assert levels["head.weight"].name == "outer"


def test_frozen_backbone_trains_head_only(tok):
    model = build_model("minilm", input_kind="tokens", num_classes=3, vocab_size=tok.vocab_size, freeze="backbone")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="model.mlp_periods"):
        build_model("minilm", input_kind="tokens", num_classes=3, vocab_size=tok.vocab_size, mlp_periods=[1, 2])


def test_mlp_levels_take_their_learning_rate_scales_from_config(tok):
    from nlcl.optim import build_optimizer

    model = build_model("minilm", input_kind="tokens", num_classes=3, vocab_size=tok.vocab_size,
                        mlp_periods=[1, 1, 8, 8, 64, 64], mlp_lr_scales=[1, 1, 0.125, 0.125, 0.25, 0.25])
    opt = build_optimizer(model, "adamw", 1e-3)
    lrs = {level: [g["lr"] for g in inner.param_groups] for level, inner in opt.inner.items()}
    assert lrs["mlp2_p8"] == [pytest.approx(1.25e-4)] and lrs["mlp5_p64"] == [pytest.approx(2.5e-4)]
    assert lrs["outer"] == [pytest.approx(1e-3)]
    with pytest.raises(ValueError, match="model.mlp_lr_scales"):
        build_model("minilm", input_kind="tokens", num_classes=3, vocab_size=tok.vocab_size, mlp_lr_scales=[1, 2])


def test_cosine_head_logits_ignore_weight_norms(tok):
    model = build_model("minilm", input_kind="tokens", num_classes=3, vocab_size=tok.vocab_size, head="cosine").eval()
    ids = tok.encode_batch(["what is my account balance", "play some jazz"], 16)
    with torch.no_grad():
        before = model(ids)
        model.head.weight[2] *= 10.0  # the newest class's weight grows: a linear head would favour it
        after = model(ids)
    torch.testing.assert_close(before, after)
    assert before.abs().max() <= model.head.scale + 1e-5
    assert [n for n, _ in model.head.named_parameters()] == ["weight"]  # no bias
    with pytest.raises(ValueError, match="model.head"):
        build_model("minilm", input_kind="tokens", num_classes=3, vocab_size=tok.vocab_size, head="knn")
