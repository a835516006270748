"""torchrun / DistributedDataParallel plumbing: process-group setup, the rank's device, and the few
collectives the loop needs (sums, object gathers, a BatchNorm-statistics average).

Launch: `torchrun --nproc_per_node N -m train.imagenet_scale ...` sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE; a plain `python -m train.imagenet_scale` is world size 1 with no process group.
Data shards use the GLOBAL rank; the CUDA device is the LOCAL rank (the DALI example's use of the local
rank as shard id reads only the first node's shards on a multi-node job).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..run_dirs import UserError

# List validation runs before training and may take minutes on a 1M-image list (it is sharded over
# the ranks, so they wait for each other only at its end); keep collectives from timing out there.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), before the process group exists."""
    return _env_int("WORLD_SIZE", 1)


def uses_cuda(device: str) -> bool:
    """Whether a config's device ("auto", "cpu", "cuda", "cuda:N") runs on CUDA here; asking for CUDA on a
    machine without it is a UserError."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"config device={device!r}: CUDA is not available here; accepted: --set device=cpu or auto"
        )
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_distributed(device: str = "auto", cpu_threads: int = 0) -> DistContext:
    """Reads the torchrun environment, picks the device (cuda:LOCAL_RANK when CUDA is used) and, for
    more than one process, joins the process group (NCCL on GPU, gloo on CPU). On the CPU each process
    computes on cpu_threads threads (0: its share of the cores)."""
    rank, world = _env_int("RANK", 0), world_size()
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    use_cuda = uses_cuda(device)
    if use_cuda:
        index = local_rank if device in ("auto", "cuda") else torch.device(device).index or 0
        torch.cuda.set_device(index)
        target = torch.device("cuda", index)
    else:
        target = torch.device("cpu")
        # N processes on one machine share its cores; without this each one starts a thread per core
        torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": target} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT, **kwargs)
    return DistContext(rank, world, local_rank, local_world, target)


def shutdown(wait_for_all: bool) -> None:
    """Leaves the process group. After a finished run every rank waits for the others first: rank 0
    still writes the last checkpoint and the summary, and a peer tearing down its gloo connections
    meanwhile aborted a rank ("terminate called without an active exception", seen once in CI). After
    an error there is no barrier: the other ranks may never reach it.

    The wait goes through the rendezvous store, not dist.barrier(): gloo's barrier work holds the last
    collectives' tensors, and its worker thread may still be releasing them (which takes the GIL) when
    the main thread, holding the GIL, frees the DDP model and with it the process group, whose
    destructor joins that thread. That deadlocked 5 of ~120 two-process CPU runs here, 0 of 83 with the
    store (torch 2.13; gdb: ~ProcessGroupGloo joining pt_gloo_runloop, which waits for the GIL in
    ~AsyncBarrierWork)."""
    if dist.is_initialized():
        if wait_for_all:
            store = dist.distributed_c10d._get_default_store()
            if store.add("train.scale.shutdown", 1) == dist.get_world_size():
                store.set("train.scale.shutdown.all", "1")
            store.wait(["train.scale.shutdown.all"])
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sums a tensor over ranks (in place) and returns it. Metrics are reduced as sums and counts, never
    as means of per-rank means (biased when shards differ in size)."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def agree(fn, ctx: DistContext):
    """fn() on every rank. When it raises a UserError on any rank, every rank raises one (with the first
    failing rank's message), so that no rank goes on into a collective the others never reach."""
    try:
        result, error = fn(), None
    except UserError as exc:
        result, error = None, str(exc)
    failed = [(rank, e) for rank, e in enumerate(all_gather_objects(error, ctx)) if e is not None]
    if failed:
        rank, message = failed[0]
        raise UserError(message if rank == 0 else f"{message} (on rank {rank})")
    return result


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's obj on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def average_batchnorm_statistics(model: torch.nn.Module, ctx: DistContext) -> None:
    """Averages BatchNorm running means and variances over ranks. DDP broadcasts rank 0's buffers at
    each forward, but the last training step updates every rank's own copy with its own batch; without
    this, ranks would evaluate with different statistics."""
    if not ctx.distributed:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(ctx.world_size)
