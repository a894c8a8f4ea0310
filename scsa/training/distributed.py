"""torch.distributed set-up under torchrun (or SLURM), and the few collectives we need.

Every rank check in the project goes through ``DistInfo.is_main``, and every collective through
a function of this module; each is a no-op (or the identity) without a process group.
"""
import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Tuple, Type

import torch
import torch.distributed as dist
from timm.utils import distribute_bn

from scsa.attention.kernels.autotune import set_agreement


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_from_slurm() -> None:
    """Export torch's env:// variables from SLURM's when srun/submitit (not torchrun) started the ranks."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(device: str = "auto", timeout_minutes: float = 30) -> "tuple[DistInfo, torch.device]":
    """env:// initialisation: NCCL for CUDA devices, Gloo otherwise; a no-op for one process."""
    _env_from_slurm()
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))
    torch_device = pick_device(device, info.local_rank)
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, store=_attempt_store(info, timeout), rank=info.rank,
                                world_size=info.world_size, timeout=timeout,
                                **({"device_id": torch_device} if backend == "nccl" else {}))
    return info, torch_device


def _attempt_store(info: DistInfo, timeout: datetime.timedelta) -> "dist.Store":
    """env://'s store (torchrun's agent store under torchrun), namespaced by restart attempt.

    torchrun keeps one store across ``--max-restarts``; without the namespace, restarted ranks
    can read the dead ranks' addresses and fail to connect or hang (seen here with Gloo).
    """
    store, _, _ = next(dist.rendezvous("env://", info.rank, info.world_size, timeout=timeout))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elementwise maximum over ranks, in place: flags any rank raised."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank, in place: rank 0 decides for everyone."""
    if dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def average_batchnorm(module: torch.nn.Module, world_size: int) -> None:
    """Average BN running statistics over ranks (timm's ``distribute_bn``), so ranks agree on them."""
    if dist.is_initialized():
        distribute_bn(module, world_size, reduce=True)


@torch.no_grad()
def replicas_identical(module: torch.nn.Module) -> bool:
    """Whether every rank holds bitwise the same parameters and buffers (a DDP invariant)."""
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    if not dist.is_initialized():
        return True
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


def gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def agree_on_kernel(choice: str, triton_ok: bool) -> str:
    """The attention path every rank runs for a case ``kernel=auto`` decided (the agreement hook of
    ``scsa.attention.kernels.autotune``, installed by ``process_group``): rank 0's choice, or the eager
    path if Triton failed or disagreed on any rank. Local timings differ; replicas must run the same ops."""
    choices = gather_objects((choice, triton_ok))
    return choices[0][0] if all(ok for _, ok in choices) else "torch"


@contextlib.contextmanager
def process_group(device: str = "auto", agreed: Tuple[Type[BaseException], ...] = ()
                  ) -> Iterator[Tuple[DistInfo, torch.device]]:
    """``init_distributed`` for the block, in which ranks agree on ``kernel=auto``'s choices; then
    teardown: after a barrier when every rank leaves together (the block finished, or raised one of
    the ``agreed`` exceptions, which all ranks raise at the same step), since Gloo teardown without
    one crashed runs; with no barrier after any other error, which one rank may hit alone: its peers
    would never reach the barrier, and the launcher stops them once this rank exits."""
    info, torch_device = init_distributed(device)
    together = False
    if dist.is_initialized():
        set_agreement(agree_on_kernel)
    try:
        yield info, torch_device
        together = True
    except agreed:
        together = True
        raise
    finally:
        set_agreement(None)
        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()
