"""`nlcl bench gpu`: the GPU speed run in one call: equivalence checks, then the benchmark, one JSON.

1. Equivalence on the device. Each mixer's chunk-parallel form runs on the device in float32 and
   under bf16 autocast, and is compared with a float64 CPU result of the same parameters and
   input: Hope's self-modifying Titans against its token-by-token reference, the Titans layer and
   the gated delta rule against their float64 chunked / sequential forms. Outputs and the
   gradients of every parameter are compared (relative error of the whole tensor); a check passes
   under its dtype's tolerance.
2. `nlcl bench` rows (tokens/s, FLOPs/token, achieved FLOP/s and fraction of the measured matmul
   peak, peak memory) for Hope, Hope-Attention, Titans, Transformer++ (and fla's DeltaNet when it
   imports) at ~340M parameters (Transformer++ at d=1024, 24 layers, 16 heads, 32k vocabulary),
   T = 2048 ... 16384, shortest first.
The JSON is rewritten after every check and row, so a run cut short keeps what it finished.

`--dry-run` runs the same code end to end on the CPU at a tiny size (what the tests run).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nlcl.bench import bench_isolated
from nlcl.flops import measured_matmul_peak

GPU_FAMILIES = ["transformer", "hope", "hope_attention", "titans"]
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # relative error of a whole output or gradient tensor


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run(module, fn, x, device, dtype_name):
    """(output, {param name: grad}) of fn(module, x) and the backward of a fixed projection of it."""
    module.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype_name == "bf16"):
        out = fn(module, x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out.float() * weights.float()).sum().backward()
    return out, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _mixers(dry_run: bool):
    """(name, float64 module, reference fn, fast fn, input) for every checked mixer."""
    from nlcl.models.memory import gated_delta_rule, gated_delta_rule_reference
    from nlcl.models.self_modifying_titans import SelfModifyingTitans, SelfModifyingTitansConfig, reference_forward
    from nlcl.models.titans import Titans, TitansConfig

    d, heads, T, B = (16, 2, 20, 2) if dry_run else (64, 4, 48, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    hope = SelfModifyingTitans(SelfModifyingTitansConfig(d_model=d, n_heads=heads)).double()
    titans = Titans(TitansConfig(d_model=d, n_heads=heads, chunk_size=8)).double()

    class DeltaRule(torch.nn.Module):  # the gated delta rule's inputs as parameters, so they get gradients
        def __init__(self):
            super().__init__()
            dh = d // heads
            self.q = torch.nn.Parameter(torch.randn(B, heads, T, dh, generator=g, dtype=torch.float64))
            self.k = torch.nn.Parameter(torch.randn(B, heads, T, dh, generator=g, dtype=torch.float64))
            self.v = torch.nn.Parameter(torch.randn(B, heads, T, dh, generator=g, dtype=torch.float64))
            self.a = torch.nn.Parameter(torch.rand(B, heads, T, generator=g, dtype=torch.float64) * 0.2 + 0.8)
            self.b = torch.nn.Parameter(torch.rand(B, heads, T, generator=g, dtype=torch.float64) * 0.5)

        def args(self):
            return (self.q, torch.nn.functional.normalize(self.k, dim=-1), self.v, self.a, self.b)

    delta = DeltaRule()
    return [
        ("hope_self_modifying_titans", hope, reference_forward, lambda m, x: m(x), x),
        ("titans_layer", titans, lambda m, x: m(x), lambda m, x: m(x), x),
        ("gated_delta_rule", delta, lambda m, x: gated_delta_rule_reference(*m.args())[0],
         lambda m, x: gated_delta_rule(*m.args(), chunk_size=8)[0], x),
    ]


def equivalence_checks(device: torch.device, dry_run: bool) -> list[dict]:
    results = []
    for name, module, reference, fast, x in _mixers(dry_run):
        ref_out, ref_grads = _run(module, reference, x, torch.device("cpu"), "fp32")  # float64 parameters: exact
        for dtype_name in ("fp32", "bf16"):
            row = {"check": name, "dtype": dtype_name, "device": str(device), "tolerance": TOLERANCE[dtype_name]}
            try:
                m = _copy(module).to(device=device, dtype=torch.float32)
                out, grads = _run(m, fast, x.to(device=device, dtype=torch.float32), device, dtype_name)
                row["output_rel_err"] = _rel(out, ref_out)
                row["grad_rel_err"] = {n: _rel(grads[n], ref_grads[n]) for n in ref_grads if n in grads}
                row["missing_grads"] = sorted(set(ref_grads) - set(grads))
                worst = max([row["output_rel_err"], *row["grad_rel_err"].values()])
                row["worst_rel_err"] = worst
                row["passed"] = bool(worst < TOLERANCE[dtype_name] and not row["missing_grads"])
            except Exception as e:  # noqa: BLE001 - a failing check is a result, not a crash
                row.update(passed=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            results.append(row)
            print(f"check {name:<28} {dtype_name}: " + (f"worst rel err {row['worst_rel_err']:.2e}"
                                                       if "worst_rel_err" in row else row.get("error", "")) +
                  (" ok" if row["passed"] else " FAILED"), flush=True)
    return results


def _copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)


def _fla_available() -> bool:
    try:
        import fla.models  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken install: the row is simply skipped
        return False
    return True


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nlcl bench gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="everything on the CPU at a tiny size")
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--families", default=None, help=f"default {','.join(GPU_FAMILIES)} (+ fla_deltanet if importable)")
    ap.add_argument("--seq-lens", default="2048,4096,8192,16384")
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-checks", action="store_true")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, dtype = torch.device("cpu"), None
        args.seq_lens, args.tokens_per_step, args.steps, args.warmup = "16", 32, 1, 0
        args.d_model, args.layers, args.heads, args.vocab = 16, 1, 2, 64
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --dry-run to exercise the script on the CPU")
        device, dtype = torch.device("cuda"), "bf16"
    families = args.families.split(",") if args.families else GPU_FAMILIES + (["fla_deltanet"] if _fla_available() else [])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"env": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "dry_run": args.dry_run, "dtype": dtype or "fp32",
                      "d_model": args.d_model, "layers": args.layers, "heads": args.heads, "vocab": args.vocab,
                      "tokens_per_step": args.tokens_per_step, "families": families},
              "checks": [], "rows": []}

    def save():
        out.write_text(json.dumps(report, indent=2))

    t0 = time.perf_counter()
    if not args.skip_checks:
        report["checks"] = equivalence_checks(device, args.dry_run)
        save()
    peak = measured_matmul_peak(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    report["env"]["matmul_peak_flops"] = peak
    print(f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s", flush=True)
    for T in (int(t) for t in args.seq_lens.split(",")):
        for family in families:
            row = bench_isolated(family=family, T=T, batch=max(1, args.tokens_per_step // T), d_model=args.d_model,
                                 n_layers=args.layers, n_heads=args.heads, vocab=args.vocab, steps=args.steps,
                                 warmup=args.warmup, device=str(device), dtype=dtype, extra={})
            if "error" not in row:
                row["fraction_of_peak"] = row["achieved_flops"] / peak
            report["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)
    report["env"]["wall_s"] = time.perf_counter() - t0
    save()
    failed = [f"{c['check']}/{c['dtype']}" for c in report["checks"] if not c["passed"]]
    errors = [f"{r['family']}/T={r['T']}" for r in report["rows"] if "error" in r]
    print(f"wrote {out}; checks failed: {failed or 'none'}; bench rows with errors: {errors or 'none'}")
    return 0
