"""Time one self-modifying Titans (or Titans) layer, forward + backward, in CPU seconds per step.

The layer figures of docs/speed.md come from this script (B = 8, T = 512, d = 128, 4 heads, one
thread). On a shared 2-core machine a single run resolves little: alternate the variants you
compare, several processes each, and read the spread, not one number.

    python docs/speed_runs/layer_ab.py compile 5          # compiled chunk steps, 5 timed steps
    python docs/speed_runs/layer_ab.py eager 3
    python docs/speed_runs/layer_ab.py compile 3 --tune    # Inductor max-autotune, C++ GEMM template
    python docs/speed_runs/layer_ab.py compile 3 --profile # torch.profiler table of one more step
    python docs/speed_runs/layer_ab.py compile 3 --titans  # the Titans layer instead
"""
import argparse
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["eager", "compile"])
ap.add_argument("steps", type=int, nargs="?", default=4)
ap.add_argument("--tune", action="store_true", help="Inductor max_autotune with the CPP,ATEN GEMM backends")
ap.add_argument("--profile", action="store_true", help="print torch.profiler's table for one more step")
ap.add_argument("--kernels", action="store_true", help="with --profile: Inductor's per-kernel profile too")
ap.add_argument("--titans", action="store_true", help="time the Titans layer (MLP memory, chunk 64)")
args = ap.parse_args()

torch.set_num_threads(1)
import torch._inductor.config as inductor_config  # noqa: E402

if args.tune:
    inductor_config.max_autotune = True
    inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
if args.kernels:
    inductor_config.cpp.enable_kernel_profile = True

torch.manual_seed(0)
compiled = args.mode == "compile"
if args.titans:
    from nlcl.models.titans import Titans, TitansConfig

    layer = Titans(TitansConfig(d_model=128, n_heads=4, compile=compiled))
else:
    from nlcl.models.self_modifying_titans import SelfModifyingTitans, SelfModifyingTitansConfig

    layer = SelfModifyingTitans(SelfModifyingTitansConfig(d_model=128, n_heads=4, compile=compiled))
x = torch.randn(8, 512, 128, requires_grad=True)


def step():
    layer(x).square().mean().backward()


t0 = time.process_time()
step()
print(args.mode, "first step (includes compiling) cpu s", round(time.process_time() - t0, 1), flush=True)
times = []
for _ in range(args.steps):
    t0 = time.process_time()
    step()
    times.append(time.process_time() - t0)
print(args.mode, "cpu s/step", [round(t, 3) for t in times], flush=True)
if args.profile:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
