"""Tests for nlcl.metrics: hand-computed matrices, the variants that bite, avalanche cross-checks."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nlcl import metrics as M
from nlcl.metrics.modules import _keep_recorded

torch.set_num_threads(1)

# Hand example, T = 3. Rows: before training, after exp 1, 2, 3. Columns: exp 1, 2, 3.
# Task 1 ROSE after it was learned (0.6 -> 0.8) and then dropped to 0.5: this is where the
# "max" and "first" forgetting references disagree.
R_HAND = [
    [0.10, 0.20, 0.30],  # b (random init)
    [0.60, 0.25, 0.35],
    [0.80, 0.90, 0.40],
    [0.50, 0.70, 0.85],
]
JOINT = [0.70, 0.95, 0.90]  # a*_k


def as_inputs(R):
    """The same matrix as list, numpy and torch (float32 and float64)."""
    return [R, np.array(R), torch.tensor(R, dtype=torch.float64), torch.tensor(R, dtype=torch.float32)]


# --------------------------------------------------------------------------------------------
# hand-computed values


@pytest.mark.parametrize("R", as_inputs(R_HAND), ids=["list", "numpy", "torch64", "torch32"])
def test_hand_computed_3x3(R):
    tol = dict(abs=1e-6)  # float32 input is within 1e-7
    # acc_final = (0.50 + 0.70 + 0.85) / 3 = 2.05 / 3
    assert M.acc_final(R) == pytest.approx(2.05 / 3, **tol)
    # A_1 = 0.6; A_2 = (0.8 + 0.9) / 2 = 0.85; A_3 = 2.05 / 3
    assert M.average_accuracy_curve(R) == pytest.approx([0.6, 0.85, 2.05 / 3], **tol)
    # acc_avg_incremental = (0.6 + 0.85 + 2.05/3) / 3 = 0.711111...
    assert M.acc_avg_incremental(R) == pytest.approx((0.6 + 0.85 + 2.05 / 3) / 3, **tol)
    # bwt = ((0.5 - 0.6) + (0.7 - 0.9)) / (T-1 = 2) = -0.15
    assert M.bwt(R) == pytest.approx(-0.15, **tol)
    # fwt = ((R_{1,2} - b_2) + (R_{2,3} - b_3)) / 2 = ((0.25 - 0.20) + (0.40 - 0.30)) / 2 = 0.075
    assert M.fwt(R) == pytest.approx(0.075, **tol)
    # forgetting_max: f_1 = max(0.6, 0.8) - 0.5 = 0.3; f_2 = 0.9 - 0.7 = 0.2; mean 0.25
    assert M.forgetting_max_per_task(R)[:2] == pytest.approx([0.3, 0.2], **tol)
    assert M.forgetting_max(R) == pytest.approx(0.25, **tol)
    # forgetting_first: f_1 = 0.6 - 0.5 = 0.1; f_2 = 0.9 - 0.7 = 0.2; mean 0.15
    assert M.forgetting_first_per_task(R)[:2] == pytest.approx([0.1, 0.2], **tol)
    assert M.forgetting_first(R) == pytest.approx(0.15, **tol)
    # the last task has no forgetting yet
    assert math.isnan(M.forgetting_max_per_task(R)[2]) and math.isnan(M.forgetting_first_per_task(R)[2])
    # curves: F_1 undefined; F_2 = 0.6 - 0.8 = -0.2 for both (only row 1 precedes step 2); F_3 as above
    fmax, ffirst = M.forgetting_max_curve(R), M.forgetting_first_curve(R)
    assert math.isnan(fmax[0]) and math.isnan(ffirst[0])
    assert fmax[1:] == pytest.approx([-0.2, 0.25], **tol)
    assert ffirst[1:] == pytest.approx([-0.2, 0.15], **tol)
    # learning_accuracy = (0.6 + 0.9 + 0.85) / 3 = 2.35 / 3
    assert M.learning_accuracy(R) == pytest.approx(2.35 / 3, **tol)
    # lower triangle: (0.6 + 0.8 + 0.9 + 0.5 + 0.7 + 0.85) / 6 = 4.35 / 6 = 0.725
    assert M.accuracy_lower_triangle(R) == pytest.approx(0.725, **tol)
    # Díaz-Rodríguez BWT, pairs (i, j): (2,1) 0.8-0.6=+0.2, (3,1) 0.5-0.6=-0.1, (3,2) 0.7-0.9=-0.2
    # sum -0.1 over 3 pairs = -1/30; rem = 1 - 1/30; bwt_plus = 0
    assert M.bwt_all_pairs(R) == pytest.approx(-1 / 30, **tol)
    assert M.rem(R) == pytest.approx(1 - 1 / 30, **tol)
    assert M.bwt_plus(R) == 0.0
    # intransigence: I = (0.70 - 0.60, 0.95 - 0.90, 0.90 - 0.85) = (0.10, 0.05, 0.05); mean 0.2/3
    assert M.intransigence_per_task(R, JOINT) == pytest.approx([0.10, 0.05, 0.05], **tol)
    assert M.intransigence(R, JOINT) == pytest.approx(0.2 / 3, **tol)


def test_all_metrics_keys_and_values():
    out = M.all_metrics(R_HAND)
    required = {"acc_final", "acc_avg_incremental", "bwt", "fwt", "forgetting_max", "forgetting_first",
                "learning_accuracy", "accuracy_lower_triangle", "rem", "bwt_plus"}
    assert required <= set(out) and "intransigence" not in out
    assert all(type(v) is float for v in out.values())
    assert out["forgetting_max"] == pytest.approx(0.25)
    assert out["bwt"] == pytest.approx(-0.15)

    with_ref = M.all_metrics(torch.tensor(R_HAND), joint_reference=torch.tensor(JOINT))
    assert with_ref["intransigence"] == pytest.approx(0.2 / 3)
    assert with_ref["intransigence_last"] == pytest.approx(0.05)  # RWalk's I_T = 0.90 - 0.85
    for k, v in out.items():
        assert with_ref[k] == pytest.approx(v)


def test_bwt_positive_when_old_tasks_improve():
    # T = 2: task 1 learned to 0.5, later 0.7 -> bwt = +0.2, forgetting = -0.2, bwt_plus = 0.2, rem = 1
    R = [[0.1, 0.1], [0.5, 0.2], [0.7, 0.9]]
    assert M.bwt(R) == pytest.approx(0.2)
    assert M.forgetting_first(R) == pytest.approx(-0.2)
    assert M.forgetting_max(R) == pytest.approx(-0.2)
    assert M.bwt_plus(R) == pytest.approx(0.2)
    assert M.rem(R) == 1.0


# --------------------------------------------------------------------------------------------
# the variants that bite


def test_forgetting_reference_max_vs_first_differ_when_accuracy_rose():
    # Task 1: 0.6 right after learning, rose to 0.8, ended at 0.5.
    assert M.forgetting_max_per_task(R_HAND)[0] == pytest.approx(0.3)  # from the peak 0.8
    assert M.forgetting_first_per_task(R_HAND)[0] == pytest.approx(0.1)  # from 0.6
    assert M.forgetting_max(R_HAND) > M.forgetting_first(R_HAND)


def test_forgetting_max_ignores_rows_before_the_task_was_learned():
    # Same as R_HAND, but tasks 2 and 3 score very high before being learned (rows 0 and 1).
    # Those rows must not become the "max" reference: forgetting stays 0.3 and 0.2.
    R = np.array(R_HAND)
    R[0, 1] = R[1, 1] = 0.99
    R[0, 2] = R[1, 2] = R[2, 2] = 0.99
    assert M.forgetting_max_per_task(R)[:2] == pytest.approx([0.3, 0.2])
    # and the curve: F_2 only looks at task 1 (row 1 -> row 2): 0.6 - 0.8
    assert M.forgetting_max_curve(R)[1] == pytest.approx(-0.2)


def test_normalisation_is_over_T_minus_1_tasks():
    # The sums over earlier tasks are -0.3 (bwt), 0.5 (forgetting_max), 0.15 (fwt): divide by 2, not 3.
    assert M.bwt(R_HAND) == pytest.approx(-0.3 / 2)
    assert M.forgetting_max(R_HAND) == pytest.approx(0.5 / 2)
    assert M.fwt(R_HAND) == pytest.approx(0.15 / 2)
    assert M.bwt(R_HAND) != pytest.approx(-0.3 / 3)


def test_fwt_uses_the_before_training_row_and_excludes_task_1():
    R = np.array(R_HAND)
    R2 = R.copy()
    R2[0, 0] = 0.9  # b_1 is never used by GEM's FWT
    assert M.fwt(R2) == pytest.approx(M.fwt(R))
    R3 = R.copy()
    R3[0, 2] = 0.0  # b_3: 0.40 - 0.0 instead of 0.40 - 0.30 -> fwt grows by 0.30 / 2
    assert M.fwt(R3) == pytest.approx(M.fwt(R) + 0.15)


def test_forgetting_first_is_minus_bwt_and_bwt_only_reads_last_row():
    rng = np.random.default_rng(0)
    for T in (2, 3, 7):
        R = rng.uniform(size=(T + 1, T))
        assert M.forgetting_first(R) == pytest.approx(-M.bwt(R))
        assert M.forgetting_max(R) >= M.forgetting_first(R) - 1e-12  # max reference >= first one


def test_single_experience_gives_nan_where_two_are_needed():
    R = [[0.2], [0.7]]
    out = M.all_metrics(R, joint_reference=[0.9])
    for key in ("bwt", "bwt_all_pairs", "fwt", "forgetting_max", "forgetting_first", "rem", "bwt_plus"):
        assert math.isnan(out[key]), key
    for key in ("acc_final", "acc_avg_incremental", "learning_accuracy", "accuracy_lower_triangle"):
        assert out[key] == pytest.approx(0.7), key
    assert out["intransigence"] == pytest.approx(0.2)


@pytest.mark.parametrize("shape", [(3, 3), (3, 4), (4,), (2, 3, 2), (1, 0), (0, 0)])
def test_wrong_shape_raises_naming_the_expected_shape(shape):
    with pytest.raises(ValueError, match=r"\[T\+1, T\]"):
        M.all_metrics(np.zeros(shape))
    with pytest.raises(ValueError, match=r"\[T\+1, T\]"):
        M.forgetting_max(torch.zeros(shape))


def test_joint_reference_wrong_shape_raises():
    with pytest.raises(ValueError, match="joint_reference"):
        M.intransigence(R_HAND, [0.9, 0.9])


# --------------------------------------------------------------------------------------------
# lower-is-better scores (perplexity)


def test_perplexity_signs_hand_computed():
    # Perplexities, lower is better. Rows: before, after exp 1, 2, 3.
    P = [
        [50.0, 60.0, 70.0],
        [10.0, 40.0, 45.0],
        [8.0, 11.0, 30.0],
        [12.0, 14.0, 9.0],
    ]
    kw = dict(higher_is_better=False)
    # forgetting_max: task 1 best earlier = min(10, 8) = 8, final 12 -> +4; task 2: 11 -> 14 -> +3
    assert M.forgetting_max_per_task(P, **kw)[:2] == pytest.approx([4.0, 3.0])
    assert M.forgetting_max(P, **kw) == pytest.approx(3.5)
    # forgetting_first: task 1: 12 - 10 = +2; task 2: +3 -> 2.5
    assert M.forgetting_first(P, **kw) == pytest.approx(2.5)
    # bwt: the scores got worse, so bwt is negative: -((12-10) + (14-11)) / 2 = -2.5
    assert M.bwt(P, **kw) == pytest.approx(-2.5)
    # fwt: ppl on the next task dropped before learning it: -((40-60) + (30-70)) / 2 = +30
    assert M.fwt(P, **kw) == pytest.approx(30.0)
    # intransigence vs joint ppl (9, 10, 8): (10-9, 11-10, 9-8) = 1 each
    assert M.intransigence(P, [9.0, 10.0, 8.0], **kw) == pytest.approx(1.0)
    # plain averages are never flipped: acc_final is the mean final perplexity (12 + 14 + 9) / 3
    out = M.all_metrics(P, higher_is_better=False)
    assert out["acc_final"] == pytest.approx(35 / 3)
    assert out["forgetting_max"] == pytest.approx(3.5)


def test_lower_is_better_equals_negated_matrix():
    rng = np.random.default_rng(1)
    P = rng.uniform(1, 100, size=(5, 4))
    for fn in (M.bwt, M.bwt_all_pairs, M.fwt, M.forgetting_max, M.forgetting_first):
        assert fn(P, higher_is_better=False) == pytest.approx(fn(-P)), fn.__name__


# --------------------------------------------------------------------------------------------
# vectorised code vs. loops written straight from the formulas (1-based indices as in the papers)


def loop_reference(R):
    T = len(R[0])
    r = lambda i, j: R[i][j - 1]  # noqa: E731  R_{i,j}, row i (0 = before), task j (1-based)
    out = {}
    out["acc_avg_incremental"] = sum(sum(r(k, j) for j in range(1, k + 1)) / k for k in range(1, T + 1)) / T
    out["bwt"] = sum(r(T, i) - r(i, i) for i in range(1, T)) / (T - 1)
    out["fwt"] = sum(r(i - 1, i) - r(0, i) for i in range(2, T + 1)) / (T - 1)
    out["forgetting_max"] = sum(max(r(l, j) for l in range(j, T)) - r(T, j) for j in range(1, T)) / (T - 1)
    out["forgetting_first"] = sum(r(j, j) - r(T, j) for j in range(1, T)) / (T - 1)
    out["accuracy_lower_triangle"] = sum(r(i, j) for i in range(1, T + 1) for j in range(1, i + 1)) / (T * (T + 1) / 2)
    out["bwt_all_pairs"] = sum(r(i, j) - r(j, j) for i in range(2, T + 1) for j in range(1, i)) / (T * (T - 1) / 2)
    curve = [float("nan")]
    for k in range(2, T + 1):
        curve.append(sum(max(r(l, j) for l in range(j, k)) - r(k, j) for j in range(1, k)) / (k - 1))
    out["forgetting_max_curve"] = curve
    return out


@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_matches_loop_reference_on_random_matrices(T):
    rng = np.random.default_rng(T)
    for _ in range(5):
        R = rng.uniform(size=(T + 1, T))
        ref = loop_reference(R.tolist())
        got = M.all_metrics(R)
        for key in ("acc_avg_incremental", "bwt", "fwt", "forgetting_max", "forgetting_first",
                    "accuracy_lower_triangle", "bwt_all_pairs"):
            assert got[key] == pytest.approx(ref[key], abs=1e-12), key
        np.testing.assert_allclose(M.forgetting_max_curve(R), ref["forgetting_max_curve"], atol=1e-12)


def test_curve_step_k_equals_metric_on_stream_prefix():
    rng = np.random.default_rng(2)
    R = rng.uniform(size=(6, 5))
    for k in range(2, 6):
        prefix = R[: k + 1, :k]
        assert M.forgetting_max_curve(R)[k - 1] == pytest.approx(M.forgetting_max(prefix))
        assert M.forgetting_first_curve(R)[k - 1] == pytest.approx(M.forgetting_first(prefix))
        assert M.average_accuracy_curve(R)[k - 1] == pytest.approx(M.acc_final(prefix))


# --------------------------------------------------------------------------------------------
# cross-check against avalanche-lib's own metric code


N_EVAL = 20  # test samples per experience: every R_HAND entry is a multiple of 1/20


def _fake_eval_batch(accuracy):
    """Labels and predictions (as avalanche's accuracy reads them) with the given exact accuracy."""
    correct = round(accuracy * N_EVAL)
    y = torch.zeros(N_EVAL, dtype=torch.long)
    pred = (torch.arange(N_EVAL) >= correct).long()
    return y, pred


def run_avalanche_stream_plugins(R, plugins):
    """Drive avalanche plugin metrics through their callbacks as its eval loop would.

    Evaluate every experience before training, then after training each experience. Returns, per
    evaluation round (row of R), each plugin's stream-level result.
    """
    T = len(R[0])
    strategy = SimpleNamespace(is_eval=True, eval_every=0, clock=SimpleNamespace(train_iterations=0))
    experiences = [
        SimpleNamespace(current_experience=j, origin_stream=SimpleNamespace(name="test"), task_labels=[0])
        for j in range(T)
    ]
    rounds = []
    for row in range(T + 1):
        if row > 0:
            strategy.is_eval = False
            strategy.experience = experiences[row - 1]
            for p in plugins:
                p.before_training_exp(strategy)
            strategy.is_eval = True
        for p in plugins:
            p.before_eval(strategy)
        for j in range(T):
            strategy.experience = experiences[j]
            strategy.mb_y, strategy.mb_output = _fake_eval_batch(R[row][j])
            for p in plugins:
                p.before_eval_exp(strategy)
                p.after_eval_iteration(strategy)
                p.after_eval_exp(strategy)
        for p in plugins:
            p.after_eval(strategy)
        rounds.append([p.result() for p in plugins])
    return rounds


def test_avalanche_stream_plugins_agree():
    from avalanche.evaluation.metrics.forgetting_bwt import StreamBWT, StreamForgetting
    from avalanche.evaluation.metrics.forward_transfer import StreamForwardTransfer

    rounds = run_avalanche_stream_plugins(R_HAND, [StreamForgetting(), StreamBWT(), StreamForwardTransfer()])
    forgetting, bwt, fwt = rounds[-1]
    # Avalanche's forgetting uses the first-after-training reference, i.e. our forgetting_first.
    assert forgetting == pytest.approx(M.forgetting_first(R_HAND))
    assert forgetting != pytest.approx(M.forgetting_max(R_HAND))
    assert bwt == pytest.approx(M.bwt(R_HAND))
    assert fwt == pytest.approx(M.fwt(R_HAND))
    # the whole forgetting curve (avalanche reports 0 where nothing can be forgotten yet)
    curve = M.forgetting_first_curve(R_HAND)
    for k in range(2, 4):
        assert rounds[k][0] == pytest.approx(curve[k - 1])


def test_avalanche_standalone_metrics_agree():
    from avalanche.evaluation.metrics.forgetting_bwt import BWT, Forgetting
    from avalanche.evaluation.metrics.forward_transfer import ForwardTransfer

    rng = np.random.default_rng(3)
    T = 6
    R = rng.uniform(size=(T + 1, T))
    forgetting, backward, forward = Forgetting(), BWT(), ForwardTransfer()
    for j in range(T):
        forward.update(j, R[0, j], initial=True)
    for i in range(1, T + 1):  # after training experience i (avalanche key i-1)
        forgetting.reset_last()
        backward.reset_last()
        for j in range(T):
            is_current = j == i - 1
            forgetting.update(j, R[i, j], initial=is_current)
            backward.update(j, R[i, j], initial=is_current)
            if j == i:  # the experience right after the one just trained
                forward.update(j, R[i, j])
    ours_first = M.forgetting_first_per_task(R)
    for j, value in forgetting.result().items():
        assert value == pytest.approx(ours_first[j])
    assert sorted(forgetting.result()) == list(range(T - 1))
    assert np.mean(list(backward.result().values())) == pytest.approx(M.bwt(R))
    assert np.mean(list(forward.result().values())) == pytest.approx(M.fwt(R))


# --------------------------------------------------------------------------------------------
# torchmetrics wrappers


def test_accuracy_matrix_metric_accumulates_rows():
    metric = M.AccuracyMatrix(num_experiences=3)
    assert torch.isnan(metric.compute()).all()
    metric.update(0, R_HAND[0])
    metric.update(2, torch.tensor(R_HAND[2], dtype=torch.float32))
    R = metric.compute()
    assert R.shape == (4, 3) and R.dtype == torch.float64
    assert torch.isnan(R[[1, 3]]).all()
    np.testing.assert_allclose(R[[0, 2]].numpy(), np.array(R_HAND)[[0, 2]], atol=1e-7)
    metric.reset()
    assert torch.isnan(metric.compute()).all()


def test_accuracy_matrix_metric_validates():
    metric = M.AccuracyMatrix(num_experiences=3)
    with pytest.raises(ValueError, match="row_index"):
        metric.update(4, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="shape"):
        metric.update(1, [0.1, 0.2])


def test_continual_metrics_equals_functions_row_by_row():
    metric = M.ContinualMetrics(num_experiences=3, joint_reference=JOINT)
    metric.update(0, R_HAND[0])
    R = np.array(R_HAND)
    for i in range(1, 4):
        metric.update(i, R_HAND[i])
        got = metric.compute()
        want = M.all_metrics(R[: i + 1, :i], joint_reference=JOINT[:i])
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, nan_ok=True), (i, key)
    assert got["forgetting_max"] == pytest.approx(0.25)


def test_continual_metrics_lower_is_better_and_missing_before_row():
    P = [[50.0, 60.0], [10.0, 40.0], [15.0, 12.0]]
    metric = M.ContinualMetrics(num_experiences=2, higher_is_better=False)
    metric.update(1, P[1])
    metric.update(2, P[2])
    got = metric.compute()
    assert math.isnan(got["fwt"])  # row 0 was never recorded
    assert got["forgetting_max"] == pytest.approx(5.0)  # ppl 10 -> 15
    assert got["bwt"] == pytest.approx(-5.0)


def test_continual_metrics_needs_a_row():
    metric = M.ContinualMetrics(num_experiences=2)
    metric.update(0, [0.1, 0.1])
    with pytest.raises(RuntimeError):
        metric.compute()


def test_dist_reduction_keeps_recorded_cells():
    a = torch.tensor([[0.1, float("nan")], [0.5, float("nan")], [float("nan")] * 2])
    b = torch.tensor([[0.1, float("nan")], [0.5, 0.2], [float("nan")] * 2])
    out = _keep_recorded(torch.stack([a, b]))
    torch.testing.assert_close(out, b, equal_nan=True)


# --- added for surviving mutants of the mutation run (docs/reliability.md) ----------------------


def test_all_metrics_passes_lower_is_better_to_every_direction_dependent_metric():
    """Perplexity matrices (lower is better): all_metrics must hand the direction to every metric
    that depends on it; each value equals that metric called on its own, and the direction-free
    ones are the same either way."""
    ppl = [[50.0, 60.0, 70.0], [20.0, 55.0, 65.0], [30.0, 18.0, 60.0], [45.0, 25.0, 15.0]]
    joint = [19.0, 17.0, 14.0]
    low, high = M.all_metrics(ppl, joint, higher_is_better=False), M.all_metrics(ppl, joint, higher_is_better=True)
    for name in ("bwt", "bwt_all_pairs", "fwt", "forgetting_max", "forgetting_first", "rem", "bwt_plus"):
        assert low[name] == pytest.approx(getattr(M, name)(ppl, False)), name
        assert low[name] != pytest.approx(high[name]), name  # the direction matters for this matrix
    per_task = M.intransigence_per_task(ppl, joint, False)
    assert low["intransigence"] == pytest.approx(per_task.mean()) and low["intransigence_last"] == pytest.approx(per_task[-1])
    assert low["intransigence"] != pytest.approx(high["intransigence"])
    for name in ("acc_final", "acc_avg_incremental", "learning_accuracy", "accuracy_lower_triangle"):
        assert low[name] == high[name]


def test_keep_recorded_keeps_negative_and_missing_values():
    # ranks hold the same value where one recorded it and nan elsewhere; a score may be negative
    stacked = torch.tensor([[[-2.0, float("nan")], [float("nan"), 0.5]],
                            [[float("nan"), float("nan")], [float("nan"), 0.5]]], dtype=torch.float64)
    out = _keep_recorded(stacked)
    assert out[0, 0] == -2.0 and out[1, 1] == 0.5 and out[0, 1].isnan() and out[1, 0].isnan()


def test_accuracy_matrix_of_one_experience_keeps_float64_values():
    m = M.AccuracyMatrix(1)
    m.update(0, [1 / 3])
    m.update(1, [2 / 3])
    R = m.compute()
    assert R.dtype == torch.float64 and R[0, 0].item() == 1 / 3 and R[1, 0].item() == 2 / 3
    with pytest.raises(ValueError, match="num_experiences"):
        M.AccuracyMatrix(0)
