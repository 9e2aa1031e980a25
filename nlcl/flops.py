"""FLOPs of one training step, counted from the operators that actually run, and the machine's
matmul peak, measured rather than looked up.

`torch.utils.flop_counter.FlopCounterMode` counts the matmul-class operators (mm, bmm, addmm,
baddbmm, convolutions, the GPU attention kernels). Two that nlcl's models run are missing from its
registry, so they are added here: the CPU attention kernel (same formula as the GPU ones, causal
masking not discounted, as torch does) and the triangular solve of the chunked delta rules
(n^2 k multiply-adds' worth for an n x n system with k right-hand sides). Elementwise work
(activations, gates, norms) is not counted, by the same convention as MFU: the count is the
arithmetic a matmul unit could do, and achieved FLOP/s against the matmul peak says how close to
it a model runs.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _solve_triangular(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """A [..., n, n] X = B [..., n, k] (left solve): n^2 k FLOPs per system (n(n+1)/2 multiply-adds
    per right-hand-side column, rounded up to n^2 like a dense product of half the size).
    A right solve X A = B [..., k, n] costs the same with the roles of the last two dims swapped."""
    *batch, n, _ = a_shape
    rhs = math.prod(b_shape) // max(n, 1)
    return n * n * rhs if len(b_shape) >= 2 else 0


EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    aten.linalg_solve_triangular: _solve_triangular,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul-class FLOPs of running fn() once (forward and, if fn calls it, backward)."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    with counter:
        fn()
    return counter.get_total_flops()


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best FLOP/s of repeated square matmuls on this device, dtype and thread count: the ceiling
    the models' achieved FLOP/s is compared with. Sizes: 1024 on CPU, 8192 on CUDA."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    torch.mm(a, b)  # warm-up (thread pool, kernel selection)
    sync(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        if time.perf_counter() > deadline:
            return best
