"""Each strategy's mechanism, shown acting on a tiny Gaussian-blob stream with real Lightning fits."""
import io
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nlcl.learner import Learner
from nlcl.models.heads import MLPClassifier
from nlcl.streams.base import Experience, TaskStream, TensorPairDataset
from nlcl.strategies import STRATEGIES, Strategy, build_strategy, strategy_names
from nlcl.strategies.regularization import EWC, SI, LwF, distillation_loss, empirical_fisher, trainable
from nlcl.strategies.rehearsal import (AGEM, Cumulative, DERPlusPlus, Joint, Replay, agem_project,
                                       concat_pairs, reservoir_slots)

DIM, NUM_CLASSES = 8, 6


def blob_stream(train_per_class=(40, 30, 20), seed=0) -> TaskStream:
    """3 experiences x 2 classes of Gaussian blobs (different sizes so that sums are telling)."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(NUM_CLASSES, DIM, generator=g)

    def blobs(classes, n):
        y = torch.tensor(classes).repeat_interleave(n)
        return TensorPairDataset(centers[y] + torch.randn(len(y), DIM, generator=g), y)

    exps = [Experience(i, f"exp{i}", [2 * i, 2 * i + 1], blobs([2 * i, 2 * i + 1], n), blobs([2 * i, 2 * i + 1], 10))
            for i, n in enumerate(train_per_class)]
    return TaskStream("blobs", exps, NUM_CLASSES, input_kind="image").validate()


def make_learner(strategy, lr=0.1, seed=0) -> Learner:
    torch.manual_seed(seed)
    model = MLPClassifier(DIM, NUM_CLASSES, hidden=16, n_layers=1)
    return Learner(model, NUM_CLASSES, lambda m: torch.optim.SGD(m.parameters(), lr=lr), strategies=[strategy],
                   log_every=10**9)


def run_experience(learner, stream, i, strategy, batch_size=16, callbacks=()) -> int:
    """What the runner does for experience i; returns the number of optimizer steps taken."""
    learner.start_experience(i, stream.classes_seen(i))
    strategy.before_experience(learner, stream, i)
    data = strategy.train_dataset(stream, i)
    before = learner.total_steps
    if len(data) > 0:
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[strategy, *callbacks])
        trainer.fit(learner, DataLoader(data, batch_size=batch_size, shuffle=True))
    strategy.after_experience(learner, stream, i)
    return learner.total_steps - before


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def check_resumable(strategy, **kwargs):
    """state_dict survives torch.save/torch.load(weights_only=True) and a fresh instance reproduces it."""
    state = strategy.state_dict()
    fresh = type(strategy)(**kwargs)
    fresh.load_state_dict(roundtrip(state))
    assert_same(fresh.state_dict(), state)
    return fresh


class Recorder(L.Callback):
    def __init__(self, fn):
        self.fn, self.values = fn, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.values.append(self.fn(pl_module, batch))


@pytest.fixture(scope="module")
def stream():
    return blob_stream()


# ---------------------------------------------------------------------------------------------


def test_registry_builds_every_strategy_with_defaults():
    assert set(strategy_names()) >= {"naive", "joint", "cumulative", "replay", "ewc", "si", "lwf", "agem", "derpp"}
    for name in strategy_names():
        s = build_strategy(name)
        assert isinstance(s, Strategy) and s.name == name and type(s) is STRATEGIES[name]
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("nope")
    with pytest.raises(ValueError, match="ewc"):
        build_strategy("ewc", not_a_field=1)


def test_joint_trains_once_on_everything_with_every_class_visible(stream):
    joint = Joint()
    learner = make_learner(joint)
    masks = Recorder(lambda m, b: m.seen_mask.clone())
    labels = Recorder(lambda m, b: b[1].clone())
    steps = [run_experience(learner, stream, i, joint, callbacks=[masks, labels]) for i in range(3)]
    total = sum(len(e.train) for e in stream.experiences)
    assert steps == [math.ceil(total / 16), 0, 0]
    assert all(bool(m.all()) for m in masks.values)
    assert sorted(torch.cat(labels.values).tolist()) == sorted(torch.cat([e.train.y for e in stream.experiences]).tolist())
    check_resumable(joint)


def test_cumulative_dataset_is_union_of_experiences_so_far(stream):
    cumulative = Cumulative()
    sizes = [len(e.train) for e in stream.experiences]
    for i in range(3):
        data = cumulative.train_dataset(stream, i)
        assert len(data) == sum(sizes[: i + 1])
        assert set(data.y.tolist()) == set(stream.classes_seen(i))
    learner = make_learner(cumulative)
    assert run_experience(learner, stream, 2, cumulative) == math.ceil(sum(sizes) / 16)


def test_concat_pairs_pads_token_inputs():
    a = TensorPairDataset(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    b = TensorPairDataset(2 * torch.ones(1, 5, dtype=torch.long), torch.tensor([2]))
    out = concat_pairs([a, b], pad_id=0)
    assert out.x.shape == (3, 5) and out.x[:2, 3:].eq(0).all() and out.x[2].eq(2).all()
    assert out.y.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# replay


def _class_counts(y):
    return {c: int((y == c).sum()) for c in torch.unique(y).tolist()}


def test_replay_buffer_is_class_balanced_and_grows_with_classes(stream):
    replay = Replay(mem_size=24, replay_batch_size=8)
    learner = make_learner(replay)
    # experience 0: nothing in memory yet, so no replay term
    learner.start_experience(0, stream.classes_seen(0))
    x0, y0 = stream.experiences[0].train.x[:4], stream.experiences[0].train.y[:4]
    assert replay.extra_loss(learner, (x0, y0), learner(x0)) is None
    run_experience(learner, stream, 0, replay)
    for i, per_class in [(0, 12), (1, 6), (2, 4)]:
        if i > 0:
            replay.after_experience(learner, stream, i)
        counts = _class_counts(replay.memory.y)
        assert counts == {c: per_class for c in stream.classes_seen(i)}
        # the exemplars are real training rows with their own labels
        for x, y in zip(replay.memory.x, replay.memory.y):
            e = stream.experiences[int(y) // 2].train
            assert ((e.x == x).all(1) & (e.y == y)).any()

    # a memory size that does not divide: never more than mem_size, shares differ by at most one
    odd = Replay(mem_size=25)
    for i in range(3):
        odd.after_experience(learner, stream, i)
        counts = list(_class_counts(odd.memory.y).values())
        assert sum(counts) <= 25 and max(counts) - min(counts) <= 1 and len(counts) == 2 * (i + 1)


def test_replay_adds_masked_loss_on_memory_and_resumes_exactly(stream):
    replay = Replay(mem_size=24, replay_batch_size=8, replay_weight=0.5)
    learner = make_learner(replay)
    run_experience(learner, stream, 0, replay)
    extras = Recorder(lambda m, b: replay.extra_loss(m, b, m(b[0])).detach())
    run_experience(learner, stream, 1, replay, callbacks=[extras])
    assert extras.values and all(v.ndim == 0 and v > 0 for v in extras.values)
    # the replay term is 0.5 x the learner's masked CE on a memory batch drawn with the same RNG
    torch.manual_seed(3)
    term = replay.extra_loss(learner, None, torch.zeros(1))
    torch.manual_seed(3)
    x, y = replay.memory.sample(8, "cpu")
    assert torch.allclose(term, 0.5 * learner.task_loss(learner(x), y))
    assert set(y.tolist()) <= set(stream.classes_seen(1))

    restored = check_resumable(replay, mem_size=24, replay_batch_size=8, replay_weight=0.5)
    for s in (replay, restored):  # the next update chooses the same exemplars after a resume
        torch.manual_seed(11)
        s.after_experience(learner, stream, 2)
    assert torch.equal(replay.memory.x, restored.memory.x) and torch.equal(replay.memory.y, restored.memory.y)


# ---------------------------------------------------------------------------------------------
# A-GEM


def test_agem_project_on_a_plain_example():
    g, r = [torch.tensor([1.0, -1.0])], [torch.tensor([0.0, 1.0])]
    assert torch.allclose(agem_project(g, r)[0], torch.tensor([1.0, 0.0]))
    g_ok = [torch.tensor([1.0, 2.0])]
    assert torch.equal(agem_project(g_ok, r)[0], g_ok[0])


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def test_agem_projects_conflicting_gradients_only(stream):
    agem = AGEM(mem_size=24, sample_size=16)
    learner = make_learner(agem)
    agem.after_experience(learner, stream, 0)
    learner.start_experience(1, stream.classes_seen(1))
    params = [p for p in learner.model.parameters()]
    torch.manual_seed(5)
    ref = agem.reference_gradient(learner, params)
    noise = [0.1 * torch.randn_like(p) for p in params]

    # conflicting: minus the memory gradient plus a little noise
    for p, r, n in zip(params, ref, noise):
        p.grad = -r + n
    before = [p.grad.clone() for p in params]
    assert _dot(before, ref) < 0
    torch.manual_seed(5)  # the hook draws the same memory sample
    agem.on_before_optimizer_step(None, learner, learner.optimizer)
    after = [p.grad for p in params]
    assert _dot(after, ref) >= -1e-6 * _dot(ref, ref)
    assert not all(torch.equal(a, b) for a, b in zip(after, before))

    # agreeing: left exactly as it was
    for p, r, n in zip(params, ref, noise):
        p.grad = r + n
    before = [p.grad.clone() for p in params]
    assert _dot(before, ref) > 0
    torch.manual_seed(5)
    agem.on_before_optimizer_step(None, learner, learner.optimizer)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_agem_runs_inside_lightning_and_resumes(stream):
    agem = AGEM(mem_size=24, sample_size=16)
    learner = make_learner(agem)
    run_experience(learner, stream, 0, agem)
    assert run_experience(learner, stream, 1, agem) > 0
    assert _class_counts(agem.memory.y) == {c: 6 for c in range(4)}
    check_resumable(agem, mem_size=24, sample_size=16)


# ---------------------------------------------------------------------------------------------
# EWC


def test_ewc_penalty_zero_first_then_positive(stream):
    ewc = EWC(ewc_lambda=10.0, decay_factor=0.5)
    learner = make_learner(ewc)
    extras = Recorder(lambda m, b: ewc.extra_loss(m, b, None))
    run_experience(learner, stream, 0, ewc, callbacks=[extras])
    assert extras.values and all(v is None for v in extras.values)

    fisher0 = {k: f.clone() for k, f in ewc.fisher.items()}
    assert set(fisher0) == set(trainable(learner.model))
    assert all((f >= 0).all() for f in fisher0.values()) and sum(f.sum() for f in fisher0.values()) > 0
    assert ewc.penalty(learner.model) == 0  # at the anchor

    extras = Recorder(lambda m, b: ewc.extra_loss(m, b, None).detach())
    run_experience(learner, stream, 1, ewc, callbacks=[extras])
    assert extras.values[0] == 0 and extras.values[-1] > 0  # the parameters leave the anchor

    # online combination: F = decay * F_0 + F_1, F_1 measured at the end of experience 1
    fisher1 = empirical_fisher(learner, stream.experiences[1].train)
    for k in fisher0:
        assert torch.allclose(ewc.fisher[k], 0.5 * fisher0[k] + fisher1[k])
    check_resumable(ewc, ewc_lambda=10.0, decay_factor=0.5)


def test_fisher_leaves_accumulated_grads_alone(stream):
    # the Fisher estimate must leave .grad as it found it (gradients a caller has accumulated, e.g.
    # across accumulate_grad_batches; slow CMS levels now keep their sums in optimizer state)
    learner = make_learner(Strategy())
    learner.start_experience(0, stream.classes_seen(0))
    params = list(learner.model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    empirical_fisher(learner, stream.experiences[0].train)
    assert all(p.grad.eq(3.0).all() for p in params)


# ---------------------------------------------------------------------------------------------
# SI


def test_si_importance_nonnegative_and_penalty_after_first_experience(stream):
    si = SI(si_lambda=1.0, xi=1e-3)
    learner = make_learner(si)
    extras = Recorder(lambda m, b: si.extra_loss(m, b, None))
    run_experience(learner, stream, 0, si, callbacks=[extras])
    assert all(v is None for v in extras.values)
    # with plain SGD every step adds -g * (-lr g) = lr g^2 >= 0 to the path integral
    assert all((w >= 0).all() for w in si.omega.values()) and sum(w.sum() for w in si.omega.values()) > 0
    assert all((imp >= 0).all() for imp in si.importance.values())
    assert sum(imp.sum() for imp in si.importance.values()) > 0
    assert si.penalty(learner.model) == 0  # at the anchor

    extras = Recorder(lambda m, b: si.extra_loss(m, b, None).detach())
    run_experience(learner, stream, 1, si, callbacks=[extras])
    assert extras.values[0] == 0 and extras.values[-1] > 0
    check_resumable(si, si_lambda=1.0, xi=1e-3)


# ---------------------------------------------------------------------------------------------
# LwF


def test_lwf_distills_old_classes_from_a_frozen_copy(stream):
    lwf = LwF(alpha=1.0, temperature=2.0)
    learner = make_learner(lwf)
    extras = Recorder(lambda m, b: lwf.extra_loss(m, b, m(b[0])))
    run_experience(learner, stream, 0, lwf, callbacks=[extras])
    assert all(v is None for v in extras.values)

    learner.start_experience(1, stream.classes_seen(1))
    lwf.before_experience(learner, stream, 1)
    x = stream.experiences[1].train.x
    logits = learner(x).detach()
    assert lwf.distillation(learner, x, logits).abs() < 1e-6  # the model equals its frozen copy
    # only the classes seen before this experience are distilled: the new ones' logits are free
    moved = logits.clone()
    moved[:, stream.experiences[1].classes] += 5.0
    assert lwf.distillation(learner, x, moved).abs() < 1e-6
    moved[:, stream.experiences[0].classes[0]] += 5.0
    assert lwf.distillation(learner, x, moved) > 1e-3
    teacher_params = [p.clone() for p in lwf.teacher.parameters()]

    extras = Recorder(lambda m, b: lwf.extra_loss(m, b, m(b[0])).detach())
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[lwf, extras])
    trainer.fit(learner, DataLoader(stream.experiences[1].train, batch_size=16, shuffle=True))
    assert extras.values[-1] > 0 and lwf.distillation(learner, x, learner(x)) > 0
    assert all(torch.equal(a, b) for a, b in zip(lwf.teacher.parameters(), teacher_params))
    assert not any(p.requires_grad for p in lwf.teacher.parameters())
    check_resumable(lwf, alpha=1.0, temperature=2.0)


def test_distillation_ignores_new_classes():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 6), torch.randn(5, 6)
    old = torch.tensor([0, 1])
    moved = student.clone()
    moved[:, 2:] += 5.0
    assert torch.allclose(distillation_loss(student, teacher, old, 2.0), distillation_loss(moved, teacher, old, 2.0))
    assert distillation_loss(teacher, teacher, old, 2.0).abs() < 1e-6
    # T^2 * KL(teacher || student) on the old classes, written out
    q, p = torch.softmax(teacher[:, old] / 3.0, -1), torch.softmax(student[:, old] / 3.0, -1)
    kl = (q * (q.log() - p.log())).sum(-1).mean()
    assert torch.allclose(distillation_loss(student, teacher, old, 3.0), 9.0 * kl, atol=1e-6)
    assert kl > 0


# ---------------------------------------------------------------------------------------------
# DER++


def test_reservoir_slots_fill_then_sample_uniformly():
    # while the memory has room, items go to consecutive slots
    assert reservoir_slots(3, 4, 10).tolist() == [3, 4, 5, 6]
    # afterwards every stream item ends up kept with probability capacity / N
    torch.manual_seed(0)
    capacity, n_items, batch, trials = 20, 200, 16, 300
    kept = torch.zeros(n_items)
    for _ in range(trials):
        owner = torch.full((capacity + 1,), -1)
        for start in range(0, n_items, batch):
            b = min(batch, n_items - start)
            owner[reservoir_slots(start, b, capacity)] = torch.arange(start, start + b)
        kept[owner[:capacity]] += 1
    freq = kept / trials
    expected = capacity / n_items
    for part in freq.chunk(4):  # early and late items alike
        assert abs(part.mean().item() - expected) < 0.02


def test_derpp_stores_logits_by_reservoir(stream):
    derpp = DERPlusPlus(mem_size=20, replay_batch_size=8)
    learner = make_learner(derpp, lr=0.0)  # the model never changes, so stored logits must equal its output
    extras = Recorder(lambda m, b: derpp.extra_loss(m, b, m(b[0])))
    run_experience(learner, stream, 0, derpp, callbacks=[extras])
    n0 = len(stream.experiences[0].train)
    assert derpp.n_seen == n0 and len(derpp) == 20
    assert extras.values[0] is None and all(v > 0 for v in extras.values[1:])
    x, y, logits = derpp.buffer()
    assert torch.allclose(logits, learner(x), atol=1e-5)
    data = stream.experiences[0].train
    for xi, yi in zip(x, y):
        assert ((data.x == xi).all(1) & (data.y == yi)).any()
    assert len({tuple(r.tolist()) for r in x}) == 20  # no row stored twice

    run_experience(learner, stream, 1, derpp)
    assert derpp.n_seen == n0 + len(stream.experiences[1].train) and len(derpp) == 20
    check_resumable(derpp, mem_size=20, replay_batch_size=8)


def test_derpp_memory_takes_token_batches_of_any_trimmed_width():
    """Batches are trimmed to their longest sequence, so widths vary from batch to batch (a CLINC150 run
    used to fail at its first narrower batch); the memory keeps the widest width, right-padded."""
    derpp = DERPlusPlus(mem_size=8)
    derpp.pad_id = 9  # the stream's pad id, not 0 (a mutant padding with 0 survived this test once)
    widths = [5, 3, 7, 4]
    for k, w in enumerate(widths):
        x = torch.full((3, w), k + 1)
        derpp.add(x, torch.full((3,), k), torch.zeros(3, 2))
    x, y, _ = derpp.buffer()
    assert x.shape == (8, 7)
    for row, label in zip(x, y):
        w = widths[int(label)]
        assert torch.all(row[:w] == label + 1) and torch.all(row[w:] == 9)


def _fisher_by_hand(model, data, seen, batch_size):
    """The empirical Fisher written out independently of nlcl: for each batch in order, the
    gradient of the cross-entropy over the seen classes' logits (plain autograd on a copy of the
    model), squared elementwise, averaged over batches."""
    import copy

    model = copy.deepcopy(model).eval()
    seen = torch.tensor(sorted(seen))
    remap = {int(c): j for j, c in enumerate(seen)}
    sums = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    batches = 0
    for start in range(0, len(data), batch_size):
        xs, ys = zip(*(data[i] for i in range(start, min(start + batch_size, len(data)))))
        x, y = torch.stack(xs), torch.tensor([remap[int(t)] for t in ys])
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x)[:, seen], y).backward()
        for k, p in model.named_parameters():
            sums[k] += p.grad * p.grad
        batches += 1
    return {k: s / batches for k, s in sums.items()}


def test_ewc_fisher_and_penalty_equal_an_independent_computation(stream):
    """Fisher = mean over batches of squared batch gradients, penalty = lambda/2 sum F (theta - theta*)^2,
    both computed here without nlcl's code; online F after experience 1 = decay F_0 + F_1. A plain L2
    penalty (weights of one) or |g| in place of g^2 gives other numbers and fails this test."""
    ewc = EWC(ewc_lambda=7.0, decay_factor=0.3, fisher_batch_size=16)
    learner = make_learner(ewc)
    run_experience(learner, stream, 0, ewc)
    expected0 = _fisher_by_hand(learner.model, stream.experiences[0].train, stream.classes_seen(0), 16)
    assert set(expected0) == set(ewc.fisher)
    for k, f in expected0.items():
        assert torch.allclose(ewc.fisher[k], f, rtol=1e-5, atol=1e-10), k
    # the estimate is not flat: weighting by ones instead would be a different penalty
    flat = torch.cat([f.flatten() for f in expected0.values()])
    assert flat.max() > 10 * flat[flat > 0].min()

    anchor = {k: p.detach().clone() for k, p in learner.model.named_parameters()}
    run_experience(learner, stream, 1, ewc)
    # the penalty at the parameters after experience 1, against the anchor of experience 0
    ewc_after_1 = {k: p.detach().clone() for k, p in learner.model.named_parameters()}
    expected1 = _fisher_by_hand(learner.model, stream.experiences[1].train, stream.classes_seen(1), 16)
    for k in expected0:
        assert torch.allclose(ewc.fisher[k], 0.3 * expected0[k] + expected1[k], rtol=1e-5, atol=1e-10), k
        assert torch.equal(ewc.anchor[k], ewc_after_1[k])

    # penalty against a known anchor and Fisher: move the parameters by a known amount
    ewc.anchor, ewc.fisher = anchor, expected0
    by_hand = 0.5 * 7.0 * sum((expected0[k] * (ewc_after_1[k] - anchor[k]) ** 2).sum() for k in anchor)
    plain_l2 = 0.5 * 7.0 * sum(((ewc_after_1[k] - anchor[k]) ** 2).sum() for k in anchor)
    got = ewc.penalty(learner.model)
    assert by_hand > 0 and torch.allclose(got, by_hand, rtol=1e-5)
    assert not torch.allclose(got, plain_l2, rtol=1e-2)
    # and its gradient is lambda F (theta - theta*), the pull the optimizer sees
    grads = torch.autograd.grad(got, list(learner.model.parameters()))
    for (k, _), g in zip(learner.model.named_parameters(), grads):
        assert torch.allclose(g, 7.0 * expected0[k] * (ewc_after_1[k] - anchor[k]), rtol=1e-4, atol=1e-12), k


# ---------------------------------------------------------------------------------------------
# loss values written out (tests added for surviving mutants of a mutation run, docs/reliability.md)


def test_derpp_loss_is_alpha_mse_on_stored_logits_plus_beta_masked_ce(stream):
    """Every memory row is the same (x, y, logits), so whatever rows the draws pick the loss is
    alpha * MSE(model(x), stored) + beta * CE over the seen classes, computed here by hand."""
    derpp = DERPlusPlus(mem_size=4, replay_batch_size=3, alpha=0.3, beta=0.7)
    learner = make_learner(derpp)
    learner.start_experience(1, stream.classes_seen(1))
    data = stream.experiences[0].train
    x0, y0 = data.x[:1], data.y[:1]
    stored = torch.linspace(-2.0, 2.0, NUM_CLASSES)[None]
    for _ in range(4):
        derpp.add(x0, y0, stored)
    out = learner(x0)
    seen = torch.tensor(stream.classes_seen(1))
    mse = ((out - stored) ** 2).mean()
    target = int((seen == y0[0]).nonzero()[0, 0])  # y0's position among the seen classes
    ce = torch.nn.functional.cross_entropy(out[:, seen], torch.tensor([target]))
    got = derpp.extra_loss(learner, (data.x[:2], data.y[:2]), learner(data.x[:2]))
    assert mse > 0.1 and ce > 0.1
    assert torch.allclose(got, 0.3 * mse + 0.7 * ce, rtol=1e-5)
    # the batch just seen waits for the end of the step to enter the memory, with its logits
    assert derpp.n_seen == 4
    derpp.on_train_batch_end(None, learner, None, None, 0)
    assert derpp.n_seen == 6


def test_lwf_term_is_alpha_times_the_distillation_weighted_by_the_batch_share(stream):
    lwf = LwF(alpha=0.25, temperature=2.0)
    learner = make_learner(lwf)
    learner.start_experience(1, stream.classes_seen(1))
    lwf.before_experience(learner, stream, 1)
    x = stream.experiences[1].train.x[:8]
    student = learner(x).detach() + torch.linspace(0, 1, NUM_CLASSES)  # away from the teacher
    plain = distillation_loss(student, lwf.teacher(x), torch.tensor(stream.classes_seen(0)), 2.0)
    assert plain > 1e-4
    learner.batch_scale = 1.0
    assert torch.allclose(lwf.extra_loss(learner, (x, None), student), 0.25 * plain)
    learner.batch_scale = 0.5  # this rank's share of the global batch (see Learner._batch_scale)
    assert torch.allclose(lwf.extra_loss(learner, (x, None), student), 0.125 * plain)


def _token_stream(pad_id=7):
    """2 experiences of token sequences whose widths differ between experiences."""
    def data(width, label):
        return TensorPairDataset(torch.full((3, width), label + 1, dtype=torch.long), torch.full((3,), label))
    exps = [Experience(0, "short", [0], data(2, 0), data(2, 0)), Experience(1, "long", [1], data(5, 1), data(5, 1))]
    return TaskStream("tokens", exps, 2, vocab_size=10, pad_id=pad_id).validate()


@pytest.mark.parametrize("strategy", [Joint(), Cumulative()])
def test_joint_and_cumulative_pad_token_experiences_with_the_streams_pad_id(strategy):
    data = strategy.train_dataset(_token_stream(pad_id=7), 0 if isinstance(strategy, Joint) else 1)
    assert data.x.shape == (6, 5)
    short = data.x[data.y == 0]
    assert torch.all(short[:, :2] == 1) and torch.all(short[:, 2:] == 7)


class _Plugged(Strategy):
    name = "plugged"

    def __init__(self, weight: float = 1.0):
        self.weight = weight


def test_build_strategy_by_target_returns_the_plugin_and_refuses_a_non_strategy():
    from nlcl.plugins import PluginError

    s = build_strategy("plugged", _target_=f"{__name__}._Plugged", weight=2.5)
    assert type(s) is _Plugged and s.weight == 2.5
    with pytest.raises(PluginError, match=r"strategy._target_: torch.nn.Identity returned Identity, not a"):
        build_strategy("x", _target_="torch.nn.Identity")
