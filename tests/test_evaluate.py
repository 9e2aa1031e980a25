"""Validation hold-out for tuning, `nlcl evaluate` on a changed stream, and the LSTM baseline."""
import json
from collections import Counter

import pytest
import torch

from nlcl.config import ConfigError, compose, validate
from nlcl.evaluate import evaluate_run
from nlcl.models import build_model
from nlcl.report import build_report
from nlcl.runner import build_parts, run
from nlcl.streams.base import StreamError
from tests.conftest import tiny_overrides


def _cfg(run_dir, *extra):
    return validate(compose(tiny_overrides(run_dir, *extra)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    return run(_cfg(run_dir, "+task.first_experiences=2", "trainer.epochs=2"), quiet=True), run_dir


def test_validation_split_is_held_out_of_training(tmp_path):
    plain = build_parts(_cfg(tmp_path / "a")).stream
    held = build_parts(_cfg(tmp_path / "b", "+task.validation_per_class=3")).stream
    for p, h in zip(plain.experiences, held.experiences):
        assert len(h.test) == 3 * len(h.classes) and len(h.train) == len(p.train) - len(h.test)
        assert torch.bincount(h.test.y, minlength=plain.num_classes)[h.classes].tolist() == [3] * len(h.classes)
        # train and validation partition the original training rows (as a multiset: truncated
        # queries can repeat); the test rows are not used at all
        rows = lambda ds: Counter(tuple(r) + (int(y),) for r, y in zip(ds.x.tolist(), ds.y))  # noqa: E731
        assert rows(p.train) == rows(h.train) + rows(h.test)
    with pytest.raises(StreamError, match="validation_per_class=10"):
        build_parts(_cfg(tmp_path / "c", "+task.validation_per_class=10"))
    with pytest.raises(ConfigError, match="task.validation_per_class"):
        _cfg(tmp_path / "d", "+task.validation_per_class=0")


def test_evaluate_without_changes_reproduces_the_last_row(finished):
    res, run_dir = finished
    rec = evaluate_run(run_dir, [], "same")
    assert rec["scores"] == pytest.approx(res["accuracy_matrix"][-1], abs=1e-12)
    saved = json.loads((run_dir / "evaluations" / "same.json").read_text())
    assert saved["mean"] == pytest.approx(sum(res["accuracy_matrix"][-1]) / 2)


def test_evaluate_on_a_changed_stream_shows_in_the_report(finished, tmp_path):
    res, run_dir = finished
    rec = evaluate_run(run_dir, ["task.test_per_class=20"], "more_test")
    assert len(rec["scores"]) == 2 and rec["overrides"] == ["task.test_per_class=20"]
    rep = build_report([run_dir], out=tmp_path / "rep", plots=False, metrics=["acc_final", "eval_more_test"])
    assert rep.agg["eval_more_test_mean"].iloc[0] == pytest.approx(rec["mean"])


@pytest.mark.parametrize("bad", ["model.d_model=64", "task.stream=banking77", "task.test_per_class"])
def test_evaluate_refuses_anything_but_task_fields(finished, bad):
    with pytest.raises(ConfigError, match="only task"):
        evaluate_run(finished[1], [bad], "x")


def test_evaluate_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        evaluate_run(tmp_path, [], "x")


def test_lstm_is_causal_and_plugs_into_the_runner(tmp_path):
    lm = build_model("lstm", input_kind="tokens", vocab_size=20, task="lm", d_model=16, n_layers=2).double()
    ids = torch.randint(1, 20, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(1, 20, (2, 5))
    assert torch.equal(lm(ids)[:, :7], lm(changed)[:, :7]) and not torch.allclose(lm(ids)[:, 7:], lm(changed)[:, 7:])
    with pytest.raises(ValueError, match="n_heads"):
        build_model("lstm", input_kind="tokens", vocab_size=20, n_heads=2)
    overrides = [o for o in tiny_overrides(tmp_path / "lstm") if not o.startswith("model.")]
    res = run(validate(compose([*overrides, "model=lstm", "model.d_model=32", "model.n_layers=1",
                                "+task.first_experiences=2"])), quiet=True)
    assert res["model"] == "lstm" and len(res["accuracy_matrix"]) == 3
