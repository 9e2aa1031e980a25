"""Rehearsal strategies: joint and cumulative training (upper bounds), experience replay, A-GEM, DER++.

Replay and A-GEM keep their exemplars in avalanche-lib's `ClassBalancedBuffer` (reservoir sampling
inside each class, the memory split equally over the classes seen so far); `ClassBalancedMemory`
feeds it our tensors and reads the chosen exemplars back as plain tensors, which is what training
samples from and what `state_dict` saves. DER++ needs a buffer updated every batch with the
model's logits, so it keeps its own tensor reservoir (`reservoir_slots`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nlcl import distributed as D
from nlcl.streams.base import TaskStream, TensorPairDataset
from nlcl.strategies.base import Strategy


# ---------------------------------------------------------------------------------------------
# datasets


def concat_pairs(datasets: list[TensorPairDataset], pad_id: int = 0) -> TensorPairDataset:
    """One dataset from several; token inputs of different lengths are right-padded with `pad_id`."""
    xs = [d.x for d in datasets]
    if len({tuple(x.shape[1:]) for x in xs}) > 1:
        if not all(x.dim() == 2 and not x.is_floating_point() for x in xs):
            raise ValueError(f"cannot concatenate inputs of shapes {[tuple(x.shape) for x in xs]}")
        width = max(x.shape[1] for x in xs)
        xs = [F.pad(x, (0, width - x.shape[1]), value=pad_id) for x in xs]
    return TensorPairDataset(torch.cat(xs), torch.cat([d.y for d in datasets]))


def empty_like(data: TensorPairDataset) -> TensorPairDataset:
    return TensorPairDataset(data.x[:0], data.y[:0])


class Joint(Strategy):
    """Upper bound: learn every experience at once, at experience 0, with every class visible."""

    name = "joint"

    def before_experience(self, learner, stream: TaskStream, index: int) -> None:
        if index == 0:
            learner.seen_mask[:] = True

    def train_dataset(self, stream: TaskStream, index: int):
        if index == 0:
            return concat_pairs([e.train for e in stream.experiences], stream.pad_id)
        return empty_like(stream.experiences[index].train)  # the runner skips fitting on it


class Cumulative(Strategy):
    """At experience i, train on the union of experiences 0..i (retraining on all data so far)."""

    name = "cumulative"

    def train_dataset(self, stream: TaskStream, index: int):
        return concat_pairs([e.train for e in stream.experiences[: index + 1]], stream.pad_id)


# ---------------------------------------------------------------------------------------------
# class-balanced episodic memory on avalanche's storage policy


def _avalanche_dataset(x: torch.Tensor, y: torch.Tensor):
    from avalanche.benchmarks.utils.classification_dataset import \
        _make_taskaware_tensor_classification_dataset

    return _make_taskaware_tensor_classification_dataset(x, y)


class ClassBalancedMemory:
    """At most `mem_size` exemplars, split equally over the classes seen so far (avalanche's
    `ClassBalancedBuffer`). `x`, `y` hold the exemplars as tensors, grouped by class."""

    def __init__(self, mem_size: int):
        if mem_size < 1:
            raise ValueError(f"mem_size must be >= 1, got {mem_size}")
        from avalanche.training.storage_policy import ClassBalancedBuffer  # slow import: only when used

        self.policy = ClassBalancedBuffer(max_size=mem_size, adaptive_size=True)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None  # avalanche's reservoir keys, saved for an exact resume

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    def add(self, data: TensorPairDataset) -> None:
        self.policy.update_from_dataset(_avalanche_dataset(data.x, data.y))
        self._read_back()

    def _read_back(self) -> None:
        xs, ys, ws = [], [], []
        for c in sorted(self.policy.buffer_groups):
            group = self.policy.buffer_groups[c]
            n = len(group.buffer)
            if n == 0:
                continue
            x, y, *_ = next(iter(DataLoader(group.buffer, batch_size=n, shuffle=False)))
            # avalanche's subsets keep the whole experience alive; a compact copy holds only the exemplars
            group.buffer = _avalanche_dataset(x, y)
            xs.append(x), ys.append(y.long()), ws.append(group._buffer_weights[:n].clone())
        if xs:
            self.x, self.y, self.weights = torch.cat(xs), torch.cat(ys), torch.cat(ws)

    def sample(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` exemplars drawn uniformly with replacement (the memory moves to `device` once)."""
        if self.x.device != torch.device(device):
            self.x, self.y = self.x.to(device), self.y.to(device)
        i = torch.randint(len(self.y), (n,), device=self.y.device)
        return self.x[i], self.y[i]

    def state_dict(self) -> dict:
        if self.y is None:
            return {"seen_classes": sorted(self.policy.seen_classes)}
        return {"x": self.x.cpu(), "y": self.y.cpu(), "weights": self.weights.cpu(),
                "seen_classes": sorted(self.policy.seen_classes)}

    def load_state_dict(self, state: dict) -> None:
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        self.policy.seen_classes = set(int(c) for c in state.get("seen_classes", []))
        self.policy.buffer_groups = {}
        if "y" not in state:
            self.x = self.y = self.weights = None
            return
        x, y, w = state["x"], state["y"].long(), state["weights"]
        for c in torch.unique(y).tolist():
            pick = y == c
            group = ReservoirSamplingBuffer(int(pick.sum()))  # resized at the next update anyway
            group.buffer = _avalanche_dataset(x[pick], y[pick])
            group._buffer_weights = w[pick].clone()
            self.policy.buffer_groups[c] = group
        self.x, self.y, self.weights = x, y, w


class _WithEpisodicMemory(Strategy):
    """A class-balanced memory filled after each experience and saved with the run (Replay, A-GEM)."""

    memory: ClassBalancedMemory

    def after_experience(self, learner, stream, index):
        self.memory.add(stream.experiences[index].train)
        if D.active():  # every rank fills it from the same data; rank 0's copy makes them identical by construction
            self.memory.load_state_dict(D.broadcast_object(self.memory.state_dict()))

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state):
        if "memory" in state:
            self.memory.load_state_dict(state["memory"])


class Replay(_WithEpisodicMemory):
    """Experience replay: each step adds `replay_weight` x masked CE on a batch drawn from a
    class-balanced memory of earlier experiences; the memory takes in each experience at its end."""

    name = "replay"

    def __init__(self, mem_size: int = 500, replay_batch_size: int = 32, replay_weight: float = 1.0):
        self.memory = ClassBalancedMemory(int(mem_size))
        self.replay_batch_size = int(replay_batch_size)
        self.replay_weight = float(replay_weight)

    def extra_loss(self, learner, batch, logits):
        if len(self.memory) == 0:
            return None
        x, y = self.memory.sample(self.replay_batch_size, logits.device)
        (x, y), scale = D.take_share(len(y), x, y, what="strategy.replay_batch_size")  # same draw on every rank
        return self.replay_weight * scale * learner.task_loss(learner(x), y)


# ---------------------------------------------------------------------------------------------
# A-GEM


def agem_project(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> list[torch.Tensor]:
    """A-GEM (Chaudhry et al. 2019): when g conflicts with the memory gradient (g . g_ref < 0),
    replace it by g - (g . g_ref / g_ref . g_ref) g_ref, whose dot product with g_ref is 0;
    otherwise g is returned unchanged (the coefficient is exactly 0). No host sync."""
    dot = sum((g.float() * r.float()).sum() for g, r in zip(grads, ref))
    ref_sq = sum((r.float() * r.float()).sum() for r in ref)
    coef = dot.clamp(max=0) / ref_sq.clamp_min(1e-12)
    return [g - (coef * r.float()).to(g.dtype) for g, r in zip(grads, ref)]


class AGEM(_WithEpisodicMemory):
    """Averaged GEM: before each optimizer step, the gradient is projected so as not to increase the
    loss on a sample of the episodic memory (class-balanced, `mem_size` exemplars).

    The reference gradient comes from torch.autograd.grad on a separate forward pass (current class
    mask), so the `.grad` of the current batch is not touched until it is replaced by its projection.
    Under a multi-frequency optimizer `.grad` is the step's fresh gradient for every level (slow levels
    keep their pending sums in the optimizer), so the projection acts on this step's gradient before
    it joins a slow level's sum.
    """

    name = "agem"

    def __init__(self, mem_size: int = 500, sample_size: int = 256):
        self.memory = ClassBalancedMemory(int(mem_size))
        self.sample_size = int(sample_size)

    def reference_gradient(self, learner, params: list[torch.Tensor]) -> list[torch.Tensor]:
        x, y = self.memory.sample(self.sample_size, params[0].device)
        (x, y), scale = D.take_share(len(y), x, y, what="strategy.sample_size")  # same draw on every rank
        with torch.enable_grad():
            loss = learner.task_loss(learner(x), y)
            ref = torch.autograd.grad(loss, params, allow_unused=True)
        ref = [torch.zeros_like(p) if r is None else r for p, r in zip(params, ref)]
        if D.active():  # the memory sample's mean gradient: weighted shares summed over the ranks
            ref = D.all_reduce_sum_([r * (scale / D.world_size()) for r in ref])
        return ref

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if len(self.memory) == 0:
            return
        params = [p for p in pl_module.model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        ref = self.reference_gradient(pl_module, params)
        with torch.no_grad():
            for p, g in zip(params, agem_project([p.grad for p in params], ref)):
                p.grad.copy_(g)


# ---------------------------------------------------------------------------------------------
# DER++


def reservoir_slots(n_seen: int, batch: int, capacity: int, device=None) -> torch.Tensor:
    """Where each sample of an incoming batch goes under reservoir sampling (Vitter's algorithm R).

    Sample k is stream item n = n_seen + k: it fills slot n while the memory is not full, otherwise it
    replaces a uniformly drawn slot with probability capacity / (n + 1). The slot `capacity` means
    "discarded". When two samples of one batch draw the same slot the later one wins, as it would in
    the sequential algorithm. Vectorised over the batch, no host sync.
    """
    pos = torch.arange(batch, device=device)
    n = n_seen + pos
    draw = (torch.rand(batch, device=device, dtype=torch.float64) * (n + 1)).long()  # uniform in 0..n
    slot = torch.where(n < capacity, n, draw).clamp(max=capacity)
    last = torch.full((capacity + 1,), -1, dtype=torch.long, device=device)
    last = last.scatter_reduce(0, slot, pos, reduce="amax")
    return torch.where(last[slot] == pos, slot, torch.full_like(slot, capacity))


class DERPlusPlus(Strategy):
    """Dark Experience Replay++ (Buzzega et al. 2020): a reservoir of (x, y, logits) filled with every
    training batch; the loss adds alpha * MSE(logits now, stored logits) on one memory batch and
    beta * masked CE on another. Logits are matched over all classes, as in the paper."""

    name = "derpp"

    def __init__(self, mem_size: int = 500, replay_batch_size: int = 32, alpha: float = 0.1, beta: float = 0.5):
        if mem_size < 1:
            raise ValueError(f"mem_size must be >= 1, got {mem_size}")
        self.mem_size = int(mem_size)
        self.replay_batch_size = int(replay_batch_size)
        self.alpha, self.beta = float(alpha), float(beta)
        self.n_seen = 0  # stream items offered to the reservoir so far
        # one extra row at the end takes the discarded samples
        self.x = self.y = self.logits = None
        self._pending = None

    def __len__(self) -> int:
        return min(self.n_seen, self.mem_size)

    def buffer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self)
        return self.x[:n], self.y[:n], self.logits[:n]

    def add(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        if self.x is None:
            rows = self.mem_size + 1
            self.x = x.new_zeros((rows, *x.shape[1:]))
            self.y = y.new_zeros(rows)
            self.logits = torch.zeros((rows, logits.shape[1]), device=logits.device)
        if x.dim() == 2 and not x.is_floating_point() and x.shape[1] != self.x.shape[1]:
            # token batches are trimmed to their longest sequence: keep the memory at the widest width
            # seen so far, right-padded (a causal model's outputs do not depend on trailing padding)
            pad = getattr(self, "pad_id", 0)
            if x.shape[1] < self.x.shape[1]:
                x = F.pad(x, (0, self.x.shape[1] - x.shape[1]), value=pad)
            else:
                self.x = F.pad(self.x, (0, x.shape[1] - self.x.shape[1]), value=pad)
        slots = reservoir_slots(self.n_seen, len(y), self.mem_size, self.x.device)
        self.x[slots] = x.to(self.x.device)
        self.y[slots] = y.to(self.y.device)
        self.logits[slots] = logits.float().to(self.logits.device)
        self.n_seen += len(y)

    def extra_loss(self, learner, batch, logits):
        # the batch goes into the reservoir after the step, with the logits it was trained on
        self._pending = (batch[0].detach(), batch[1].detach(), logits.detach())
        if len(self) == 0:
            return None
        device = logits.device
        if self.x.device != device:
            self.x, self.y, self.logits = self.x.to(device), self.y.to(device), self.logits.to(device)
        # the same draws on every rank, each rank takes its share of them
        i = torch.randint(len(self), (self.replay_batch_size,), device=device)
        (i,), scale = D.take_share(len(i), i, what="strategy.replay_batch_size")
        mse = F.mse_loss(learner(self.x[i]).float(), self.logits[i])
        j = torch.randint(len(self), (self.replay_batch_size,), device=device)
        (j,), _ = D.take_share(len(j), j, what="strategy.replay_batch_size")
        ce = learner.task_loss(learner(self.x[j]), self.y[j])
        return scale * (self.alpha * mse + self.beta * ce)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._pending is not None:
            pending = self._pending if not D.active() else self._gather(pl_module, *self._pending)
            self.add(*pending)
            self._pending = None

    def before_experience(self, learner, stream, index):
        self.pad_id = stream.pad_id

    def _gather(self, learner, x, y, logits):
        """The global batch from every rank's share, in rank order (= the single-process batch), so that
        every rank offers the reservoir the same samples with the same random draws."""
        n_local = learner.batch_share[0] if learner.batch_share is not None else len(y)
        parts = D.all_gather_objects((x[:n_local].cpu(), y[:n_local].cpu(), logits[:n_local].cpu()))
        xs = [p[0] for p in parts]
        if x.dim() == 2 and not x.is_floating_point():  # trimmed token batches: widen to the widest share
            width = max(t.shape[1] for t in xs)
            xs = [F.pad(t, (0, width - t.shape[1]), value=getattr(self, "pad_id", 0)) for t in xs]
        return (torch.cat(xs).to(x.device), torch.cat([p[1] for p in parts]).to(y.device),
                torch.cat([p[2] for p in parts]).to(logits.device))

    def state_dict(self):
        if self.x is None:
            return {"n_seen": self.n_seen}
        x, y, logits = self.buffer()
        return {"n_seen": self.n_seen, "x": x.cpu(), "y": y.cpu(), "logits": logits.cpu()}

    def load_state_dict(self, state):
        self.n_seen = int(state.get("n_seen", 0))
        self.x = self.y = self.logits = None
        if "x" in state:
            x, y, logits = state["x"], state["y"], state["logits"]
            rows = self.mem_size + 1
            self.x = torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])
            self.y = torch.cat([y, y.new_zeros(rows - len(y))])
            self.logits = torch.cat([logits, logits.new_zeros((rows - len(logits), logits.shape[1]))])
