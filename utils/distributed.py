"""Several processes, one run (DDP under torchrun): join, agree, gather, leave.

Each rank trains on its own windows of every batch; DistributedDataParallel averages the gradients,
so every rank holds the same weights. One process (`torchrun --nproc_per_node=1`, or plain python)
is world size 1, and each helper here then does nothing.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size). Under torchrun, join the process group (NCCL for GPUs, Gloo for CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """The model as DDP calls it: gradients all-reduced across ranks in backward."""
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def max_over_ranks(values: list[float], device: torch.device, world: int) -> list[float]:
    """Each value's largest across the ranks, so that every rank decides alike (when to stop, which lr)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_from_ranks(obj, world: int) -> list:
    """Every rank's `obj` (e.g. RNG states), so a resumed multi-GPU run continues as each rank would have."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def wait_for_all_ranks() -> None:
    """No rank tears the process group down while another still uses it."""
    if dist.is_initialized():
        dist.barrier()


def leave_process_group() -> None:
    """Tear the process group down (also after an error), so the process exits cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()
