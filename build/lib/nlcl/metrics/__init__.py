"""Continual-learning metrics over the accuracy matrix R of shape [T+1, T] (row 0: before training).

Pure functions live in ``functional``; ``modules`` has thin torchmetrics wrappers around them.
"""

from nlcl.metrics.functional import (
    acc_avg_incremental,
    acc_final,
    accuracy_lower_triangle,
    accuracy_matrix,
    all_metrics,
    average_accuracy_curve,
    bwt,
    bwt_all_pairs,
    bwt_plus,
    forgetting_first,
    forgetting_first_curve,
    forgetting_first_per_task,
    forgetting_max,
    forgetting_max_curve,
    forgetting_max_per_task,
    fwt,
    intransigence,
    intransigence_per_task,
    learning_accuracy,
    rem,
)
from nlcl.metrics.modules import AccuracyMatrix, ContinualMetrics

__all__ = [
    "AccuracyMatrix",
    "ContinualMetrics",
    "acc_avg_incremental",
    "acc_final",
    "accuracy_lower_triangle",
    "accuracy_matrix",
    "all_metrics",
    "average_accuracy_curve",
    "bwt",
    "bwt_all_pairs",
    "bwt_plus",
    "forgetting_first",
    "forgetting_first_curve",
    "forgetting_first_per_task",
    "forgetting_max",
    "forgetting_max_curve",
    "forgetting_max_per_task",
    "fwt",
    "intransigence",
    "intransigence_per_task",
    "learning_accuracy",
    "rem",
]
