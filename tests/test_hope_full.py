"""model=hope_full: self-modifying Titans followed by a CMS with an in-context level and step levels."""
import torch
from omegaconf import OmegaConf

from nlcl.config import compose
from nlcl.levels import parameter_levels
from nlcl.models import build_model
from nlcl.models.cms import CMSLevel
from nlcl.models.incontext import InContextLM, incontext_stats
from nlcl.models.self_modifying_titans import SelfModifyingTitans


def test_hope_full_is_self_modifying_titans_then_token_and_step_levels(tmp_path):
    cfg = compose([f"run_dir={tmp_path}", "model=hope_full", "model.n_layers=1", "model.d_model=32",
                   "model.n_heads=2"])
    kw = OmegaConf.to_container(cfg.model, resolve=True)
    kw.pop("name")
    torch.manual_seed(0)
    model = build_model(cfg.model.name, input_kind="tokens", vocab_size=50, task="lm", **kw)
    assert isinstance(model, InContextLM)
    block = model.backbone.blocks[0]
    assert isinstance(block.mixer, SelfModifyingTitans)
    units = [(lv.spec.unit, lv.spec.period) for lv in block.cms.levels if isinstance(lv, CMSLevel)]
    assert units == [("token", 16), ("step", 1), ("step", 8), ("step", 64)]
    step_levels = {s.name: s.period for s in parameter_levels(model).values()}
    assert step_levels == {"outer": 1, "cms1_p1": 1, "cms2_p8": 8, "cms3_p64": 64}  # the token level's
    # initial state is trained by the outer optimizer
    ids = torch.randint(1, 50, (2, 40))
    logits = model(ids)
    writes = incontext_stats(model)
    assert list(writes) == ["backbone.blocks.0.cms.levels.0"]
    assert float(writes["backbone.blocks.0.cms.levels.0"]["write_norm"]) > 0  # it learned in context
    logits.float().logsumexp(-1).mean().backward()
    assert block.cms.levels[0].mlp.up.weight.grad.abs().sum() > 0


def test_the_learner_hands_task_targets_to_in_context_levels():
    from nlcl.learner import Learner
    from nlcl.models.incontext import next_token_targets
    from nlcl.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model("hope_attention", input_kind="tokens", vocab_size=30, task="lm", d_model=32, n_layers=1,
                        n_heads=2, cms={"periods": [4, 1], "units": ["token", "step"], "inner_lr": [0.5, 0.0]})
    assert model.learns_from_targets
    learner = Learner(model, 30, lambda m: build_optimizer(m, "sgd", 0.1), objective="lm")
    x = torch.randint(1, 30, (2, 16))
    y = torch.full_like(x, -100)
    y[:, 5::4] = next_token_targets(x)[:, 5::4]  # an answer mask: a few positions carry the loss
    with torch.no_grad():
        loss = learner.training_step((x, y), 0)
        from_task = learner.task_loss(model(x, y), y)
        from_context = learner.task_loss(model(x), y)
    torch.testing.assert_close(loss, from_task)
    assert abs(float(from_task - from_context)) > 1e-4  # next-input prediction would teach otherwise
