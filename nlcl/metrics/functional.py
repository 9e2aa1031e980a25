"""Continual-learning metrics as pure functions of the accuracy matrix.

The accuracy matrix ``R`` has shape ``[T+1, T]``:

- row 0 is the evaluation BEFORE any training (the random-init model, needed for FWT);
- row ``i`` (1..T) is the evaluation after training on experience ``i`` (1-based);
- column ``j`` (0-based here, experience ``j+1`` in the papers) is the test score on that experience.

In the docstrings ``R_{i,j}`` uses the papers' 1-based task index for ``j``, which is column
``j-1`` of the array; the row index is the same in both (row 0 = before training).
Definitions: docs/metrics.md; every function names its variant.

Inputs may be numpy arrays, torch tensors or nested lists; scalars come back as Python floats and
vectors as float64 numpy arrays. Metrics that need at least two experiences (BWT, FWT, forgetting,
REM, BWT+) return ``nan`` when T == 1. NaN entries in ``R`` (e.g. an evaluation that was skipped)
propagate into every metric that reads them.

``higher_is_better=False`` is for scores where lower is better (perplexity, loss). The
transfer/forgetting metrics are then computed on ``-R``, so their sign conventions stay the same
as for accuracy: forgetting is positive when the score got WORSE (perplexity went up), BWT and FWT
are positive when the score got BETTER, intransigence is positive when the model is worse than
the joint reference. Plain averages (acc_final, learning_accuracy, ...) are never flipped: they
stay means of the raw score.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "accuracy_matrix",
    "average_accuracy_curve",
    "acc_final",
    "acc_avg_incremental",
    "bwt",
    "bwt_all_pairs",
    "fwt",
    "forgetting_max_per_task",
    "forgetting_first_per_task",
    "forgetting_max_curve",
    "forgetting_first_curve",
    "forgetting_max",
    "forgetting_first",
    "learning_accuracy",
    "intransigence_per_task",
    "intransigence",
    "accuracy_lower_triangle",
    "rem",
    "bwt_plus",
    "all_metrics",
]

NAN = float("nan")


# --------------------------------------------------------------------------------------------
# input handling


def accuracy_matrix(R) -> np.ndarray:
    """Return ``R`` as a float64 numpy array after checking it has shape [T+1, T] with T >= 1."""
    if hasattr(R, "detach"):  # torch tensor; metrics are off the training path, a host copy is fine
        R = R.detach().cpu().double().numpy()
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[1] < 1 or R.shape[0] != R.shape[1] + 1:
        raise ValueError(
            "accuracy matrix must have shape [T+1, T] (row 0 = evaluation before training, "
            f"row i = after experience i, column j = experience j), got shape {tuple(R.shape)}"
        )
    return R


def _signed(R, higher_is_better: bool) -> np.ndarray:
    # Flip lower-is-better scores once, so every formula below reads "bigger is better".
    R = accuracy_matrix(R)
    return R if higher_is_better else -R


def _num_tasks(R: np.ndarray) -> int:
    return R.shape[1]


def _after(R: np.ndarray) -> np.ndarray:
    """The T x T block of rows 1..T: ``_after(R)[i-1, j-1] == R_{i,j}``."""
    return R[1:]


# --------------------------------------------------------------------------------------------
# accuracy


def average_accuracy_curve(R) -> np.ndarray:
    """A_k = (1/k) sum_{j<=k} R_{k,j} for k = 1..T (Chaudhry et al. 2018); index k-1 holds A_k."""
    A = _after(accuracy_matrix(R))
    T = _num_tasks(A)
    seen = np.tril(np.ones((T, T), dtype=bool))  # row k-1 keeps columns of tasks 1..k
    return np.where(seen, A, 0.0).sum(axis=1) / np.arange(1, T + 1)


def acc_final(R) -> float:
    """GEM's ACC = A_T = (1/T) sum_i R_{T,i}: mean of the last row."""
    return float(accuracy_matrix(R)[-1].mean())


def acc_avg_incremental(R) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017, iCaRL): (1/T) sum_k A_k."""
    return float(average_accuracy_curve(R).mean())


def learning_accuracy(R) -> float:
    """Learning accuracy (Riemer et al. 2019): (1/T) sum_i R_{i,i}, the plasticity proxy."""
    return float(np.diagonal(_after(accuracy_matrix(R))).mean())


def accuracy_lower_triangle(R) -> float:
    """Díaz-Rodríguez et al. 2018 A: mean of R_{i,j} over i >= j (diagonal included), T(T+1)/2 cells."""
    A = _after(accuracy_matrix(R))
    return float(A[np.tril_indices(_num_tasks(A))].mean())


# --------------------------------------------------------------------------------------------
# transfer


def bwt(R, higher_is_better: bool = True) -> float:
    """GEM backward transfer: (1/(T-1)) sum_{i=1}^{T-1} (R_{T,i} - R_{i,i}); negative = forgetting.

    Averaged over the T-1 earlier tasks (the last task cannot be forgotten yet). nan when T == 1.
    """
    A = _after(_signed(R, higher_is_better))
    T = _num_tasks(A)
    if T < 2:
        return NAN
    return float((A[-1, :-1] - np.diagonal(A)[:-1]).mean())


def bwt_all_pairs(R, higher_is_better: bool = True) -> float:
    """Díaz-Rodríguez et al. 2018 BWT: mean of (R_{i,j} - R_{j,j}) over all pairs j < i <= T.

    Unlike GEM's BWT it looks at every step after a task was learned, not just the final one;
    T(T-1)/2 terms. nan when T == 1.
    """
    A = _after(_signed(R, higher_is_better))
    T = _num_tasks(A)
    if T < 2:
        return NAN
    below_diagonal = np.tril_indices(T, k=-1)  # (row i, column j) with j < i
    return float((A - np.diagonal(A)[None, :])[below_diagonal].mean())


def fwt(R, higher_is_better: bool = True) -> float:
    """GEM forward transfer: (1/(T-1)) sum_{i=2}^{T} (R_{i-1,i} - b_i), with b = R[0] (before training).

    The accuracy on task i just before learning it, minus the random-init model's accuracy on it.
    Task 1 is excluded (nothing was learned before it). nan when T == 1.
    """
    R = _signed(R, higher_is_better)
    T = _num_tasks(R)
    if T < 2:
        return NAN
    # The diagonal of the [T+1, T] array, R[k, k], is the score on task k+1 just before learning it;
    # dropping k = 0 (that is b_1 itself) leaves R_{i-1,i} for i = 2..T.
    just_before = np.diagonal(R)[1:]
    return float((just_before - R[0, 1:]).mean())


def rem(R, higher_is_better: bool = True) -> float:
    """Díaz-Rodríguez et al. 2018 remembering: 1 - |min(BWT, 0)| with their all-pairs BWT."""
    b = bwt_all_pairs(R, higher_is_better)
    return 1.0 - abs(min(b, 0.0)) if not math.isnan(b) else NAN


def bwt_plus(R, higher_is_better: bool = True) -> float:
    """Díaz-Rodríguez et al. 2018 positive backward transfer: max(BWT, 0) with their all-pairs BWT."""
    b = bwt_all_pairs(R, higher_is_better)
    return max(b, 0.0) if not math.isnan(b) else NAN


# --------------------------------------------------------------------------------------------
# forgetting
#
# f_j^k = reference_j^k - R_{k,j} for tasks j < k, with two reference variants:
#   max   (Chaudhry et al. 2018; Mammoth, PyCIL, Continuum...): max_{l in [j, k-1]} R_{l,j}.
#         The max starts at l = j: rows before task j was learned do not count.
#   first (Avalanche): R_{j,j}, the score right after learning task j.
# Per-task vectors and curves are aligned with R's indices and hold nan where undefined.


def _forgetting_matrix(R, higher_is_better: bool, reference: str) -> np.ndarray:
    """F[k-1, j-1] = f_j^k for j < k, nan elsewhere (T x T)."""
    A = _after(_signed(R, higher_is_better))
    T = _num_tasks(A)
    if reference == "max":
        # best_so_far[l-1, j-1] = max over rows j..l of R_{., j}; cells with l < j (task j not yet
        # learned) are masked out, so a high score before learning never becomes the reference.
        learned = np.tril(np.ones((T, T), dtype=bool))
        best_so_far = np.maximum.accumulate(np.where(learned, A, -np.inf), axis=0)
        ref = np.full((T, T), np.nan)
        ref[1:] = best_so_far[:-1]  # for step k use rows up to k-1
    elif reference == "first":
        ref = np.broadcast_to(np.diagonal(A)[None, :], (T, T))
    else:
        raise ValueError(f"reference must be 'max' or 'first', got {reference!r}")
    earlier_tasks = np.tril(np.ones((T, T), dtype=bool), k=-1)  # j < k
    return np.where(earlier_tasks, ref - A, np.nan)


def _mean_over_earlier_tasks(x: np.ndarray) -> np.ndarray:
    """Row k-1 -> mean of x[k-1, j-1] over j < k; row 0 has no earlier task and gives nan."""
    defined = np.tril(np.ones(x.shape, dtype=bool), k=-1)
    counts = defined.sum(axis=1)
    sums = np.where(defined, x, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def forgetting_max_per_task(R, higher_is_better: bool = True) -> np.ndarray:
    """Chaudhry forgetting of each task at the end: f_j^T = max_{l in [j, T-1]} R_{l,j} - R_{T,j}.

    Length T, index j-1 for task j; the last task has no forgetting yet (nan).
    """
    return _forgetting_matrix(R, higher_is_better, "max")[-1]


def forgetting_first_per_task(R, higher_is_better: bool = True) -> np.ndarray:
    """Avalanche-style forgetting of each task at the end: R_{j,j} - R_{T,j}. Length T, last is nan."""
    return _forgetting_matrix(R, higher_is_better, "first")[-1]


def forgetting_max_curve(R, higher_is_better: bool = True) -> np.ndarray:
    """Chaudhry's average forgetting F_k = (1/(k-1)) sum_{j<k} f_j^k for k = 1..T (index k-1).

    F_1 is nan (nothing to forget yet); F_T is ``forgetting_max``.
    """
    return _mean_over_earlier_tasks(_forgetting_matrix(R, higher_is_better, "max"))


def forgetting_first_curve(R, higher_is_better: bool = True) -> np.ndarray:
    """F_k with the first-after-training reference R_{j,j}; index k-1, F_1 is nan."""
    return _mean_over_earlier_tasks(_forgetting_matrix(R, higher_is_better, "first"))


def forgetting_max(R, higher_is_better: bool = True) -> float:
    """Chaudhry et al. 2018 F_T: mean over j < T of max_{l in [j, T-1]} R_{l,j} - R_{T,j}. nan if T == 1."""
    return float(forgetting_max_curve(R, higher_is_better)[-1])


def forgetting_first(R, higher_is_better: bool = True) -> float:
    """Avalanche-style F_T: mean over j < T of R_{j,j} - R_{T,j} (equals -bwt). nan if T == 1."""
    return float(forgetting_first_curve(R, higher_is_better)[-1])


# --------------------------------------------------------------------------------------------
# intransigence


def intransigence_per_task(R, joint_reference, higher_is_better: bool = True) -> np.ndarray:
    """Chaudhry et al. 2018 I_k = a*_k - R_{k,k} for k = 1..T (index k-1).

    ``joint_reference[k-1]`` is a*_k, the accuracy on task k of a model trained jointly on tasks
    1..k (or of the final joint run, as an approximation). Positive = less plastic than joint.
    """
    A = _after(_signed(R, higher_is_better))
    T = _num_tasks(A)
    if hasattr(joint_reference, "detach"):
        joint_reference = joint_reference.detach().cpu().double().numpy()
    ref = np.asarray(joint_reference, dtype=np.float64)
    if ref.shape != (T,):
        raise ValueError(f"joint_reference must have shape [T] = ({T},), got shape {tuple(ref.shape)}")
    if not higher_is_better:
        ref = -ref
    return ref - np.diagonal(A)


def intransigence(R, joint_reference, higher_is_better: bool = True) -> float:
    """Mean intransigence over tasks, (1/T) sum_k I_k. RWalk's tables report I_T (``[-1]`` of the vector)."""
    return float(intransigence_per_task(R, joint_reference, higher_is_better).mean())


# --------------------------------------------------------------------------------------------
# everything at once


def all_metrics(R, joint_reference=None, higher_is_better: bool = True) -> dict[str, float]:
    """Every scalar metric, keyed by its variant name. Intransigence keys only with a reference."""
    R = accuracy_matrix(R)
    out = {
        "acc_final": acc_final(R),
        "acc_avg_incremental": acc_avg_incremental(R),
        "learning_accuracy": learning_accuracy(R),
        "accuracy_lower_triangle": accuracy_lower_triangle(R),
        "bwt": bwt(R, higher_is_better),
        "bwt_all_pairs": bwt_all_pairs(R, higher_is_better),
        "fwt": fwt(R, higher_is_better),
        "forgetting_max": forgetting_max(R, higher_is_better),
        "forgetting_first": forgetting_first(R, higher_is_better),
        "rem": rem(R, higher_is_better),
        "bwt_plus": bwt_plus(R, higher_is_better),
    }
    if joint_reference is not None:
        per_task = intransigence_per_task(R, joint_reference, higher_is_better)
        out["intransigence"] = float(per_task.mean())
        out["intransigence_last"] = float(per_task[-1])
    return out
