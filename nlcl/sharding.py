"""Parameter sharding for trainer.strategy=fsdp: torch's `fully_shard` (FSDP2) under Lightning's
ModelParallelStrategy, and the per-rank form of sharded state that a checkpoint stores.

Lightning's FSDPStrategy wraps models in torch's older FullyShardedDataParallel and refuses a CPU
accelerator ("The strategy `fsdp` requires a GPU accelerator"); its ModelParallelStrategy calls the
LightningModule's `configure_model` inside each rank with a device mesh, where `shard_model` applies
`fully_shard` (every parameter becomes a DTensor holding this rank's rows). That strategy runs with
gloo on CPU and NCCL on GPU alike, so the path tested on CPU is the one a GPU run takes.

`to_local` / `from_local` turn a state holding DTensors (the multi-frequency optimizer's per-level
inner states and pending period sums) into this rank's shards plus their layout and back: what each
rank saves, and what it loads into a freshly sharded model's optimizer.
"""
from __future__ import annotations

import torch
from torch import nn


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of nlcl's backbones (each becomes its own FSDP unit, gathered one at a time)."""
    for owner in (model, getattr(model, "backbone", None)):
        blocks = getattr(owner, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            return list(blocks)
    return []


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """fully_shard every block, then the whole model (embeddings, heads, norms); in place, once."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def to_local(obj):
    """`obj` with every DTensor replaced by a CPU copy of this rank's shard and its layout (shape,
    stride, placements), so no rank ever holds, saves or sends a full tensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(obj, DTensor):
        layout = []
        for p in obj.placements:
            if not isinstance(p, (Shard, Replicate)):
                raise TypeError(f"unexpected placement {p} in a sharded state")
            layout.append(p.dim if isinstance(p, Shard) else -1)
        return {"__shard__": obj.to_local().detach().cpu().clone(), "layout": layout, "shape": list(obj.shape),
                "stride": list(obj.stride())}
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_local(v) for v in obj)
    return obj


def from_local(obj, mesh, device=None):
    """Inverse of `to_local` on `mesh`: every saved shard wrapped back as a DTensor with its layout
    (on `device`, this rank's device, when given)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(obj, dict) and "__shard__" in obj:
        local = obj["__shard__"] if device is None else obj["__shard__"].to(device)
        placements = [Replicate() if d < 0 else Shard(d) for d in obj["layout"]]
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(obj["shape"]),
                                  stride=tuple(obj["stride"]))
    if isinstance(obj, dict):
        return {k: from_local(v, mesh, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_local(v, mesh, device) for v in obj)
    return obj


def full_model_state(model: nn.Module) -> dict:
    """The whole model's state dict on rank 0's CPU (an all-gather every rank takes part in); other
    ranks get an empty dict. Its keys are the unsharded model's, so it loads into one as is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
