"""`nlcl bench`: training throughput of the model families, measured side by side in one run.

For each family and sequence length a causal LM (embedding, blocks, tied head) takes full training
steps (forward, backward, AdamW) on random tokens. Reported per row:
  tokens/s        timed steps after untimed warm-up (CUDA synchronised before reading the clock);
  FLOPs/token     matmul-class FLOPs of one forward + backward, counted by torch's FlopCounterMode
                  from the operators that ran (`nlcl.flops`), divided by the step's tokens;
  achieved FLOP/s FLOPs/token x tokens/s, and its fraction of the matmul peak measured at the start
                  of the same run (same device, dtype and threads): how close to the arithmetic
                  limit the model runs, which tokens/s alone cannot say;
  peak memory     CUDA: max allocated; CPU: the peak resident set the step added to an idle process;
  x T++           tokens/s over Transformer++'s at the same length;
  tok/cpu-s       tokens per second of this process's CPU time: on a shared machine the wall clock
                  also counts the time other processes held the cores, this does not.
Every row runs in a fresh process, so one model's memory (or crash) never shows up in another row.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import torch

FAMILIES = ["transformer", "hope", "hope_attention", "titans"]


def _resident_gb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        return None
    return None


def build_lm(family: str, vocab: int, d_model: int, n_layers: int, n_heads: int, extra: dict) -> torch.nn.Module:
    from nlcl.models import build_model

    if family == "fla_deltanet":
        return _fla_deltanet(vocab, d_model, n_layers, n_heads)
    kw = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, **extra.get(family, {}))
    return build_model(family, input_kind="tokens", vocab_size=vocab, task="lm", **kw)


def bench_one(family: str, T: int, batch: int, d_model: int, n_layers: int, n_heads: int, vocab: int,
              steps: int, warmup: int, device: str, dtype: str | None, extra: dict, threads: int | None = None,
              compile: bool = False) -> dict:
    """One row, in the calling process. dtype: None (fp32) or 'bf16' (autocast). `compile`: every
    self-modifying Titans layer and MLP-memory Titans layer runs its chunk steps through torch.compile
    (`model.memory.compile`); the warm-up steps pay the compilation, the timed steps do not."""
    from nlcl.flops import count_flops
    from nlcl.models import count_parameters

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    amp = torch.bfloat16 if dtype == "bf16" else None
    rss_idle = _resident_gb("VmRSS")
    torch.manual_seed(0)
    model = build_lm(family, vocab, d_model, n_layers, n_heads, extra).to(device)
    compiled = []
    if compile:
        from nlcl.models.self_modifying_titans import SelfModifyingTitans
        from nlcl.models.titans import Titans

        compiled = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)
                    or (isinstance(m, Titans) and m.cfg.memory == "mlp")]  # linear memories stay eager
        for m in compiled:
            m.cfg.compile = True
    n_params = count_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(1, vocab, (batch, T + 1), device=device)

    def forward_backward():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()

    def step():
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    elapsed, cpu_elapsed = time.perf_counter() - t0, time.process_time() - c0
    if device.type == "cuda":
        peak_gb, memory_kind = torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    else:
        hwm = _resident_gb("VmHWM")
        peak_gb = None if hwm is None or rss_idle is None else hwm - rss_idle
        memory_kind = "cpu_peak_rss_above_idle_process"
    # counted after timing (the dispatch mode slows the step down); the optimizer step is elementwise
    # (eager: a dispatch mode and compiled frames do not mix, and the count is of the same formula)
    for m in compiled:
        m.cfg.compile = False
    flops = count_flops(forward_backward)
    for m in compiled:
        m.cfg.compile = True
    opt.zero_grad(set_to_none=True)
    tokens = batch * T
    tokens_per_s = tokens * steps / elapsed
    return {"family": family, "T": T, "batch": batch, "n_params": n_params, "tokens_per_s": tokens_per_s,
            "cpu_tokens_per_s": tokens * steps / cpu_elapsed if cpu_elapsed > 0 else None,
            "step_ms": 1000 * elapsed / steps, "flops_per_token": flops / tokens,
            "achieved_flops": flops / tokens * tokens_per_s, "peak_memory_gb": peak_gb, "memory_kind": memory_kind,
            "compiled_layers": len(compiled)}


def _child(queue, kwargs):
    try:
        queue.put(bench_one(**kwargs))
    except Exception as e:  # noqa: BLE001 - reported as the row's error, e.g. OOM
        queue.put({"family": kwargs["family"], "T": kwargs["T"], "error": f"{type(e).__name__}: {str(e)[:200]}"})


def bench_isolated(**kwargs) -> dict:
    """bench_one in a fresh (spawned) process: its own peak memory, its own crash."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kwargs))
    proc.start()
    try:
        row = queue.get()
    except Exception as e:  # noqa: BLE001
        row = {"family": kwargs["family"], "T": kwargs["T"], "error": f"child process: {e}"}
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in row:
        row["error"] = f"child process exited with {proc.exitcode}"
    return row


def _fla_deltanet(vocab, d_model, n_layers, n_heads):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = DeltaNetForCausalLM(DeltaNetConfig(vocab_size=vocab, hidden_size=d_model,
                                                        num_hidden_layers=n_layers, num_heads=n_heads))

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    return Wrapped()


def format_table(rows: list[dict], peak: float | None) -> str:
    base = {r["T"]: r["tokens_per_s"] for r in rows if r["family"] == "transformer" and "error" not in r}
    lines = [f"{'family':<16}{'T':>7}{'params':>12}{'tokens/s':>11}{'x T++':>7}{'step ms':>10}"
             f"{'tok/cpu-s':>10}{'MFLOP/tok':>11}{'GFLOP/s':>9}{'of peak':>9}{'peak GB':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['family']:<16}{r['T']:>7}  error: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base[r["T"]] if r["T"] in base else float("nan")
        frac = f"{100 * r['achieved_flops'] / peak:.1f}%" if peak else "-"
        mem = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.3f}"
        lines.append(f"{r['family']:<16}{r['T']:>7}{r['n_params']:>12,}{r['tokens_per_s']:>11,.0f}{ratio:>7.2f}"
                     f"{r['step_ms']:>10.1f}{r['cpu_tokens_per_s'] or 0:>10,.0f}{r['flops_per_token'] / 1e6:>11.2f}{r['achieved_flops'] / 1e9:>9.2f}"
                     f"{frac:>9}{mem:>9}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nlcl bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma list; add fla_deltanet where fla-core is installed")
    ap.add_argument("--seq-lens", default="256", help="comma list of sequence lengths")
    ap.add_argument("--tokens-per-step", type=int, default=4096, help="batch = tokens_per_step // T (at least 1)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=260)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="bf16 | fp32 | auto (bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--extra", default="{}", help='JSON of per-family model fields, e.g. {"hope": {"cms": {"periods": [1]}}}')
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the self-modifying Titans and Titans (MLP memory) chunk steps (model.memory.compile); needs --warmup >= 1")
    args = ap.parse_args(argv)
    if args.dtype not in ("auto", "bf16", "fp32"):
        ap.error(f"--dtype must be bf16, fp32 or auto, got {args.dtype!r}")
    try:
        extra = json.loads(args.extra)
    except json.JSONDecodeError as e:
        ap.error(f"--extra is not valid JSON: {e}")
    if args.compile and args.warmup < 1:
        ap.error("--compile needs --warmup >= 1: the first step compiles, and it must not be timed")
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": "bf16", "fp32": None}.get(args.dtype, "bf16" if device.type == "cuda" else None)
    from nlcl.flops import measured_matmul_peak

    peak = measured_matmul_peak(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
           "torch": torch.__version__, "dtype": dtype or "fp32", "d_model": args.d_model, "layers": args.layers,
           "heads": args.heads, "vocab": args.vocab, "matmul_peak_flops": peak, "compile": args.compile}
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s ({env['device']}, {env['dtype']})", flush=True)
    rows = []
    for T in seq_lens:
        for family in args.families.split(","):
            rows.append(bench_isolated(family=family, T=T, batch=max(1, args.tokens_per_step // T), d_model=args.d_model,
                                       n_layers=args.layers, n_heads=args.heads, vocab=args.vocab, steps=args.steps,
                                       warmup=args.warmup, device=args.device, dtype=dtype, extra=extra,
                                       threads=args.threads, compile=args.compile))
            if "error" not in rows[-1]:
                rows[-1]["fraction_of_peak"] = rows[-1]["achieved_flops"] / peak
            table = format_table(rows, peak).splitlines()  # ratios need the Transformer++ row of this T
            print("\n".join(table if len(rows) == 1 else table[-1:]), flush=True)
    print("\n" + json.dumps(env))
    print(format_table(rows, peak))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    return 0
