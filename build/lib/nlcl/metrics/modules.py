"""Thin torchmetrics wrappers: accumulate the accuracy matrix row by row, compute via ``functional``.

The runner evaluates every experience after each experience and calls
``metric.update(row_index, accuracies)`` with one full row (row 0 = before training). The
accuracies it passes are already global numbers (each came from a synced evaluation), so when
states are synced across processes every rank is expected to hold the same matrix; the reduction
keeps one copy of each recorded cell.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from nlcl.metrics import functional as F


def _keep_recorded(stacked: torch.Tensor) -> torch.Tensor:
    # Ranks hold identical values where recorded and nan elsewhere: nanmax keeps the recorded one.
    return torch.nan_to_num(stacked, nan=-torch.inf).amax(dim=0).where(
        ~stacked.isnan().all(dim=0), torch.nan
    )


class AccuracyMatrix(Metric):
    """Holds R of shape [T+1, T] (nan until recorded); ``compute()`` returns it as a float64 tensor."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None  # it is a matrix, not a score

    def __init__(self, num_experiences: int, **kwargs):
        super().__init__(**kwargs)
        if num_experiences < 1:
            raise ValueError(f"num_experiences must be >= 1, got {num_experiences}")
        self.num_experiences = num_experiences
        shape = (num_experiences + 1, num_experiences)
        self.add_state("matrix", default=torch.full(shape, torch.nan, dtype=torch.float64),
                       dist_reduce_fx=_keep_recorded)

    def update(self, row_index: int, accuracies) -> None:
        """Record row ``row_index`` (0 = before training, i = after experience i): T scores."""
        T = self.num_experiences
        if not 0 <= int(row_index) <= T:
            raise ValueError(f"row_index must be in [0, {T}] (0 = before training), got {row_index}")
        row = torch.as_tensor(accuracies, dtype=torch.float64).detach().to(self.matrix.device)
        if row.shape != (T,):
            raise ValueError(f"accuracies must have shape [T] = ({T},), got {tuple(row.shape)}")
        self.matrix[int(row_index)] = row

    def compute(self) -> torch.Tensor:
        return self.matrix.clone()


class ContinualMetrics(AccuracyMatrix):
    """``compute()`` -> dict of every metric in ``functional.all_metrics`` over the experiences so far.

    After experience k (rows 1..k recorded) the metrics are those of the stream cut to its first k
    experiences, R[:k+1, :k]. Row 0 may be missing: metrics that need it (fwt) are then nan.
    """

    def __init__(self, num_experiences: int, joint_reference=None, higher_is_better: bool = True,
                 **kwargs):
        super().__init__(num_experiences, **kwargs)
        self.joint_reference = None if joint_reference is None else list(map(float, joint_reference))
        self.score_higher_is_better = higher_is_better

    def compute(self) -> dict[str, float]:
        R = self.matrix.cpu()
        recorded = ~R[1:].isnan().all(dim=1)
        k = int(recorded.long().cumprod(0).sum())  # experiences recorded in order from the first
        if k == 0:
            raise RuntimeError("ContinualMetrics.compute() needs at least the row after experience 1")
        reference = None if self.joint_reference is None else self.joint_reference[:k]
        return F.all_metrics(R[: k + 1, :k], reference, self.score_higher_is_better)
