"""The same training work on one CPU process and on two (DDP over gloo), timed in one command.

usage: python docs/results/ddp_speed/ddp_speed.py [OUT_DIR] [--threads N]

Both runs get identical overrides (same stream, model, global batch, epochs, seed) except
trainer.devices / trainer.strategy, and every process is limited to N intra-op threads (default 1),
so two processes use twice the cores of one. Reported: the training time summed over experiences
(results.json timings, which leave out process start-up, stream building and evaluation), the wall
time of each `nlcl run` command, and the ratios one process / two processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

OVERRIDES = ["task=clinc150", "task.train_per_class=20", "task.test_per_class=10", "+task.first_experiences=3",
             "model=transformer", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "trainer.epochs=1",
             "trainer.batch_size=64", "trainer.accelerator=cpu", "trainer.progress_bar=false", "logger=csv", "seed=0"]


def timed_run(run_dir: Path, devices: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("LOCAL_RANK", None)
    # the installed `nlcl` script, as a user runs it (Lightning starts rank 1 by re-running this command)
    cmd = [str(Path(sys.executable).with_name("nlcl")), "run", f"run_dir={run_dir}", *OVERRIDES, f"trainer.devices={devices}",
           f"trainer.strategy={'ddp' if devices > 1 else 'auto'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    res = json.loads((run_dir / "results.json").read_text())
    train = sum(t["train_s"] for t in res["timings"]["experiences"])
    return {"devices": devices, "train_s": train, "wall_s": wall, "steps": res["total_steps"],
            "accuracy_matrix": res["accuracy_matrix"]}


def main(argv: list[str]) -> None:
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 1
    rest = [a for i, a in enumerate(argv) if a != "--threads" and (i == 0 or argv[i - 1] != "--threads")]
    out = Path(rest[0] if rest else "runs/ddp_speed")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    one = timed_run(out / f"{stamp}-1proc", 1, threads)
    two = timed_run(out / f"{stamp}-2proc", 2, threads)
    same_R = one["accuracy_matrix"] == two["accuracy_matrix"]
    print(f"work: {' '.join(OVERRIDES)}; {one['steps']} optimizer steps; {threads} thread(s) per process; "
          f"{os.cpu_count()} CPU cores visible")
    print("| processes | training s (sum over experiences) | wall s (whole command) |")
    print("|---|---|---|")
    for r in (one, two):
        print(f"| {r['devices']} | {r['train_s']:.1f} | {r['wall_s']:.1f} |")
    print(f"ratio 1 process / 2 processes: training {one['train_s'] / two['train_s']:.2f}x, "
          f"wall {one['wall_s'] / two['wall_s']:.2f}x; same R on both: {same_R}")


if __name__ == "__main__":
    main(sys.argv[1:])
