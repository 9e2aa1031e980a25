"""`nlcl bench`: training throughput of the model families, measured side by side in one process.

For each family and sequence length: a causal LM (embedding, blocks, tied head) takes full
training steps (forward, backward, AdamW) on random tokens. Reported: tokens/s, MFU against the
device's peak (6 N FLOPs per token plus attention's 12 L d T), peak memory, and the ratio of
tokens/s to Transformer++ at the same length. Warm-up steps are not timed; CUDA timings
synchronise before reading the clock.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from nlcl.models import build_model, count_parameters

FAMILIES = ["transformer", "hope", "hope_attention", "titans"]
# dense bf16 peak FLOP/s by device-name fragment, for MFU; CPUs get none (MFU left blank)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def model_flops_per_token(n_params: int, n_layers: int, d_model: int, T: int, attention: bool) -> float:
    return 6 * n_params + (12 * n_layers * d_model * T if attention else 0)


def bench_one(family: str, T: int, batch: int, d_model: int, n_layers: int, n_heads: int, vocab: int,
              steps: int, warmup: int, device: torch.device, dtype: torch.dtype | None, extra: dict) -> dict:
    torch.manual_seed(0)
    kw = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, **extra.get(family, {}))
    if family == "fla_deltanet":
        model = _fla_deltanet(vocab, d_model, n_layers, n_heads).to(device)
    else:
        model = build_model(family, input_kind="tokens", vocab_size=vocab, task="lm", **kw).to(device)
    n_params = count_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(1, vocab, (batch, T + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    tokens_per_s = batch * T * steps / elapsed
    peak = peak_flops(device)
    flops = model_flops_per_token(n_params, n_layers, d_model, T, family in ("transformer", "hope_attention"))
    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"family": family, "T": T, "batch": batch, "n_params": n_params, "tokens_per_s": tokens_per_s,
            "step_ms": 1000 * elapsed / steps, "mfu": flops * tokens_per_s / peak if peak else None,
            "peak_memory_gb": mem / 2**30, "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"}


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


def format_table(rows: list[dict]) -> str:
    base = {r["T"]: r["tokens_per_s"] for r in rows if r["family"] == "transformer" and "error" not in r}
    lines = [f"{'family':<16}{'T':>7}{'params':>12}{'tokens/s':>12}{'x T++':>8}{'step ms':>10}{'MFU':>7}{'peak GB':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['family']:<16}{r['T']:>7}  error: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base[r["T"]] if r["T"] in base else float("nan")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        lines.append(f"{r['family']:<16}{r['T']:>7}{r['n_params']:>12,}{r['tokens_per_s']:>12,.0f}{ratio:>8.2f}"
                     f"{r['step_ms']:>10.1f}{mfu:>7}{r['peak_memory_gb']:>9.2f}")
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}.get(args.dtype, torch.bfloat16 if device.type == "cuda" else None)
    rows = []
    for T in [int(t) for t in args.seq_lens.split(",")]:
        for family in args.families.split(","):
            try:
                rows.append(bench_one(family, T, max(1, args.tokens_per_step // T), args.d_model, args.layers,
                                      args.heads, args.vocab, args.steps, args.warmup, device, dtype,
                                      json.loads(args.extra)))
            except Exception as e:  # noqa: BLE001 - one family failing (e.g. OOM) must not hide the others
                rows.append({"family": family, "T": T, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(format_table(rows[-1:]) if len(rows) > 1 else format_table(rows), flush=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
           "torch": torch.__version__, "dtype": str(dtype), "d_model": args.d_model, "layers": args.layers}
    print("\n" + json.dumps(env))
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    return 0
