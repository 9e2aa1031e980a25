"""One rank of the sharded multi-frequency optimizer test (tests/test_fsdp_state.py).

It shards a small Hope with torch's per-parameter sharding (`fully_shard`, FSDP2: every parameter a
DTensor sharded over the ranks) directly, without Lightning, and checks what a checkpoint of the
multi-frequency optimizer must carry under sharding: every rank saves its own shards of the
per-level inner states, the pending period sums and the step counter; a fresh model and optimizer
load them and training continues exactly as it would have without the interruption.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from nlcl.sharding import from_local, to_local  # what the runner saves under trainer.strategy=fsdp


def build(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nlcl.models import build_model
    from nlcl.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model("hope", input_kind="tokens", num_classes=6, vocab_size=40, pad_id=0, task="classify",
                        d_model=32, n_layers=2, n_heads=2, cms={"periods": [1, 3], "unit": "step"})
    mesh = init_device_mesh("cpu", (world,))
    model.mesh = mesh
    for block in getattr(model, "blocks", getattr(getattr(model, "backbone", model), "blocks", [])):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, build_optimizer(model, "adamw", lr=3e-3)


def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(1, 40, (8, 12), generator=g)
    y = torch.randint(0, 6, (8,), generator=g)
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    return x[share], y[share]


def train(model, opt, steps, rank, world):
    for step in steps:
        x, y = batch(step, rank, world)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items() if hasattr(v, "full_tensor")}


def main(rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.tensor import DTensor

    model, opt = build(world)
    slow = [lvl for lvl, spec in opt.levels.items() if spec.period > 1]
    train(model, opt, range(4), rank, world)  # 4 steps: the period-3 level has one step pending
    saved = {"model": to_local(model.state_dict()), "optim": to_local(opt.state_dict())}
    path = os.path.join(out, f"rank{rank}.pt")
    torch.save(saved, path)
    pending = [a for lvl in slow for a in opt.accumulators[lvl] if a is not None]
    slow_at_save = [p.full_tensor().clone() for lvl in slow for p in opt.level_params(lvl)]
    train(model, opt, range(4, 9), rank, world)
    slow_moved = max((p.full_tensor() - q).abs().max().item()
                     for p, q in zip([p for lvl in slow for p in opt.level_params(lvl)], slow_at_save))
    uninterrupted = full_params(model)

    model2, opt2 = build(world)
    state = torch.load(path, weights_only=True)
    model2.load_state_dict(from_local(state["model"], model2.mesh))
    opt2.load_state_dict(from_local(state["optim"], model2.mesh))
    assert opt2.step_count == 4
    train(model2, opt2, range(4, 9), rank, world)
    resumed = full_params(model2)
    report = {
        "rank": rank,
        "slow_levels": slow,
        "pending_sums_saved": len(pending),
        "pending_sums_are_sharded": all(isinstance(a, DTensor) for a in pending),
        "local_shard_numel": sum(v["__shard__"].numel() for v in state["model"].values() if isinstance(v, dict)),
        "full_numel": sum(v.numel() for v in uninterrupted.values()),
        "max_abs_diff": max((uninterrupted[k] - resumed[k]).abs().max().item() for k in uninterrupted),
        "slow_level_moved_after_resume": slow_moved,
        "step_count": opt2.step_count,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1])
