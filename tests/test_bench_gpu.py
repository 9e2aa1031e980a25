"""`nlcl bench gpu --dry-run`: the one-call GPU script runs end to end on the CPU, so it cannot rot."""
import json

import pytest
import torch

from nlcl.bench_gpu import GPU_FAMILIES, main


def test_dry_run_writes_checks_and_one_row_per_family(tmp_path):
    out = tmp_path / "gpu" / "bench.json"
    assert main(["--dry-run", "--out", str(out), "--families", ",".join(GPU_FAMILIES)]) == 0
    report = json.loads(out.read_text())
    assert report["env"]["dry_run"] and report["env"]["matmul_peak_flops"] > 0
    checks = {(c["check"], c["dtype"]): c for c in report["checks"]}
    assert {name for name, _ in checks} == {"hope_self_modifying_titans", "titans_layer", "gated_delta_rule"}
    for (name, dtype), c in checks.items():
        assert "error" not in c, c
        assert not c["missing_grads"] and c["grad_rel_err"], name
        if dtype == "fp32":  # float32 must reproduce the float64 reference (outputs and every gradient)
            assert c["passed"], c
        else:  # bf16 autocast: measured and recorded; it differs from fp32 by more than rounding
            assert 0 < c["worst_rel_err"] < 1
    rows = report["rows"]
    assert [r["family"] for r in rows] == GPU_FAMILIES and not any("error" in r for r in rows)
    assert all(r["flops_per_token"] > 0 and r["fraction_of_peak"] > 0 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_without_cuda_it_asks_for_the_dry_run(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "--dry-run" in capsys.readouterr().err
