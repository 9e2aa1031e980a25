"""The few collectives a continual-learning run needs beyond Lightning's own training strategy.

Lightning (DDP, FSDP) distributes the optimizer steps. What happens between experiences (evaluating
every experience, filling replay memories, estimating importances) runs outside `trainer.fit`, so it
talks to the process group Lightning set up through these helpers. With one process every helper
is the identity, so single-process runs never touch torch.distributed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def share(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items; shares differ by at most one and are
    in rank order, so concatenating them in rank order gives the items back in their order."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def _comm_device(t: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors, NCCL CUDA tensors
    return torch.device("cpu") if dist.get_backend() == "gloo" else t.device


def all_reduce_sum_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over the ranks, in place, with one collective for all of them."""
    if not active() or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64 if t.is_floating_point() else torch.long)
                      for t in tensors])
    if any(t.is_floating_point() for t in tensors) and not all(t.is_floating_point() for t in tensors):
        raise TypeError("all_reduce_sum_: mix floating-point and integer tensors in separate calls")
    device = flat.device
    flat = flat.to(_comm_device(tensors[0]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(device)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t).to(t.dtype))
        offset += n
    return tensors


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank (pickled; for small state such as a replay memory)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's object, in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's object, in rank order, on rank `dst` (None elsewhere): e.g. each rank's shards."""
    if not active():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp")
# the command line as the user typed it (set by `nlcl run`): what Lightning re-runs to start the other ranks
RELAUNCH_ARGV: list[str] | None = None


def trainer_strategy(name: str, world: int):
    """The Lightning strategy each experience's Trainer uses. The processes exist by then (see
    `start_processes`), so `ddp_spawn` trains as `ddp` inside them. `fsdp` is Lightning's
    ModelParallelStrategy with every rank in one data-parallel group: torch's `fully_shard` (FSDP2),
    applied by the learner's configure_model (nlcl.sharding explains why not Lightning's FSDPStrategy)."""
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    if world == 1 and name in ("auto", "ddp", "ddp_spawn"):
        return "auto"
    return {"auto": "ddp", "ddp_spawn": "ddp"}.get(name, name)


def start_processes(accelerator: str, devices: int, num_nodes: int, strategy: str):
    """Create the run's processes and their process group with Lightning Fabric, once per process.

    Fabric's launcher either finds processes made by a cluster (torchrun, SLURM's srun: one task per
    device) or starts the others itself by re-running this command with LOCAL_RANK set; then it
    initialises torch.distributed (gloo on CPU, NCCL on GPU). Every Trainer built afterwards finds
    both and reuses them. Returns the Fabric object (its `.device` is this rank's device).
    """
    import lightning as L

    # avalanche-lib builds a text logger when first imported and refuses to on a rank other than 0 once
    # a process group exists; importing it first (as replay and A-GEM will) keeps it out of that check
    import avalanche.training.storage_policy  # noqa: F401

    # Fabric only starts the processes and the process group here, which is DDP's job under fsdp too
    launch_as = "ddp" if strategy == "fsdp" else trainer_strategy(strategy, devices * num_nodes)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=launch_as)
    if not active():
        if RELAUNCH_ARGV is not None:
            import sys

            sys.argv = list(RELAUNCH_ARGV)
        fabric.launch()
    return fabric


def take_share(n: int, *tensors: torch.Tensor, what: str = "batch"):
    """This rank's share of n items drawn identically on every rank (e.g. a replay batch), and the factor
    that makes the mean of a loss over the share add up, after DDP averages gradients over the ranks,
    to the mean over all n: share / n * world. With one process: the tensors and 1.0."""
    if not active():
        return tensors, 1.0
    lo, hi = share(n)
    if hi == lo:
        raise ValueError(f"{what} of {n} samples is smaller than the {world_size()} processes sharing it; "
                         "make it at least as large as trainer.devices x trainer.num_nodes")
    return tuple(t[lo:hi] for t in tensors), (hi - lo) * world_size() / n
