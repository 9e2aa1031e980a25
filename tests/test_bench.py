"""`nlcl bench`: FLOPs counted from the operators that run, and one tiny end-to-end run."""
import json

import torch
import torch.nn.functional as F

from nlcl.bench import bench_one, main
from nlcl.flops import count_flops


def test_linear_forward_backward_is_six_n_a_b():
    n, a, b = 5, 7, 3
    layer = torch.nn.Linear(a, b, bias=False)
    x = torch.randn(n, a, requires_grad=True)
    assert count_flops(lambda: layer(x).sum().backward()) == 6 * n * a * b


def test_cpu_attention_and_triangular_solve_are_counted():
    B, H, T, d = 2, 3, 16, 8
    q, k, v = (torch.randn(B, H, T, d) for _ in range(3))
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) == 4 * B * H * T * T * d
    N, n, r = 4, 6, 5
    A = torch.eye(n) + torch.randn(N, n, n).tril(-1)
    rhs = torch.randn(N, n, r)
    assert count_flops(lambda: torch.linalg.solve_triangular(A, rhs, upper=False)) == N * n * n * r


def test_transformer_flops_per_token_match_the_architecture():
    d, L, H, V, T = 32, 2, 4, 64, 16
    row = bench_one("transformer", T, 2, d, L, H, V, steps=1, warmup=0, device="cpu", dtype=None, extra={})
    hidden = 32 * ((8 * d // 3 + 31) // 32)  # SwiGLU width
    linear = L * 2 * (3 * d * d + d * d + 2 * d * hidden + hidden * d) + 2 * d * V  # tied head
    attention = L * 4 * T * d  # QK^T and PV over the full T x T (torch does not discount the mask)
    # backward: two matmuls per linear one; attention's recomputes the scores (5 per 2 forward)
    assert row["flops_per_token"] == 3 * linear + 3.5 * attention
    assert row["achieved_flops"] == row["flops_per_token"] * row["tokens_per_s"]
    assert row["peak_memory_gb"] > 0


def test_bench_end_to_end_writes_one_row_per_family(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--families", "transformer,hope", "--seq-lens", "16", "--tokens-per-step", "32", "--d-model", "16",
                 "--layers", "1", "--heads", "2", "--steps", "1", "--warmup", "0", "--threads", "1",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    peak = data["env"]["matmul_peak_flops"]
    assert peak > 0
    rows = {r["family"]: r for r in data["rows"]}
    assert set(rows) == {"transformer", "hope"} and not any("error" in r for r in rows.values())
    for r in rows.values():
        assert r["flops_per_token"] > 0 and r["peak_memory_gb"] > 0 and r["cpu_tokens_per_s"] > 0
        assert r["fraction_of_peak"] == r["achieved_flops"] / peak
    assert "MFLOP/tok" in capsys.readouterr().out


def test_bench_compile_flag_compiles_every_self_modifying_layer_and_needs_a_warmup(tmp_path):
    """--compile: both Hope layers run compiled (batch 2, T 40, d 16: the shapes of
    tests/test_compiled_chunks.py, so Inductor's cache usually serves it); FLOPs are the eager count."""
    eager = bench_one("hope", 40, 2, 16, 2, 2, 64, steps=1, warmup=0, device="cpu", dtype=None, extra={})
    row = bench_one("hope", 40, 2, 16, 2, 2, 64, steps=1, warmup=1, device="cpu", dtype=None, extra={}, compile=True)
    from nlcl.models import memory as mem
    from nlcl.models import self_modifying_titans as smt

    assert eager["compiled_layers"] == 0 and row["compiled_layers"] == 2
    assert mem._COMPILE_FAILED == [] and smt.generation_chunk in mem._COMPILED  # it did run compiled
    assert row["flops_per_token"] == eager["flops_per_token"] and row["tokens_per_s"] > 0
    import pytest

    with pytest.raises(SystemExit):
        main(["--families", "hope", "--compile", "--warmup", "0", "--out", str(tmp_path / "x.json")])


def test_the_layer_timing_script_of_docs_speed_runs_runs():
    """docs/speed_runs/layer_ab.py gives docs/speed.md its layer figures: it must keep running
    (eager, one timed step, both layers), so the documented commands do not rot."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "docs" / "speed_runs" / "layer_ab.py"
    for extra in ([], ["--titans"]):
        out = subprocess.run([sys.executable, str(script), "eager", "1", *extra], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        line = [s for s in out.stdout.splitlines() if "cpu s/step" in s]
        assert len(line) == 1 and line[0].count(",") == 0 and float(line[0].split("[")[1].rstrip("]")) > 0, out.stdout
