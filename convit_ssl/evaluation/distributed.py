"""torch.distributed for evaluation, in one place: process group, shards of a dataset, gathers and gradient sums.

Evaluations (``linear-probe``, ``knn``, feature extraction) run as one process or as many, started by torchrun, by
SLURM through the launcher, or by hand, which set the ``env://`` variables: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (the GPU of the process on its node), ``MASTER_ADDR`` and ``MASTER_PORT``. ``init_from_env`` joins the
group (gloo on CPU, nccl on CUDA); without ``WORLD_SIZE`` (or with 1) everything here is the one-process case and
touches no process group.

Shards follow ``torch.utils.data.DistributedSampler(shuffle=False, drop_last=False)``: rank r of W reads samples
r, r + W, r + 2W, ...; the sampler pads the last round with samples from the start so that every rank has
ceil(N / W), and ``shard_indices`` leaves those padded duplicates out, so no sample is counted twice and none is
missed. ``gather_rows`` puts the rows of every rank back in dataset order by
the dataset indices they carry.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from convit_ssl.errors import UsageError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a whole number: torchrun and SLURM set it, unset it for one "
                         f"process") from None


def init_from_env(device: str) -> str:
    """Join the process group the environment describes, once; returns the device of this process.

    ``device`` "cuda" becomes "cuda:LOCAL_RANK" (nccl); "cpu" uses gloo. One process (no ``WORLD_SIZE`` or 1):
    ``device`` unchanged, no group.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return device
    missing = [name for name in ENV_KEYS if not os.environ.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the ranks with torchrun (or the "
                         f"launcher), which sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank, world_size=world)
    return device


def active() -> bool:
    """Whether this process is one of several (a process group of more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes results and prints them."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (end of a command); nothing without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value):
    """Rank 0's ``value`` (any picklable object of our own making) on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_indices(num_samples: int, rank_: Optional[int] = None, world: Optional[int] = None) -> np.ndarray:
    """Dataset indices of this rank's shard, (n_r,) int64 in sampler order, without the sampler's padding.

    ``DistributedSampler(shuffle=False)`` gives rank r of W the entries r, r + W, r + 2W, ... of the index list
    ``arange(W * ceil(N / W)) % N``: the dataset padded to a multiple of W by wrapping round to its first samples.
    The padded entries (positions >= N) are duplicates, left out here: ``arange(r, N, W)``.
    """
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    return np.arange(rank_, num_samples, world, dtype=np.int64)


def _tensor_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(rows: np.ndarray, indices: np.ndarray, num_samples: int) -> np.ndarray:
    """The rows of every rank, (num_samples, ...) in dataset order; ``rows[i]`` is sample ``indices[i]``.

    Every sample must come from exactly one rank (``shard_indices``); without a process group ``rows`` is returned
    in order.
    """
    rows = np.asarray(rows)
    if not active():
        ordered = np.empty((num_samples, *rows.shape[1:]), dtype=rows.dtype)
        ordered[indices] = rows
        return ordered
    device = _tensor_device()
    longest = -(-num_samples // world_size())
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=torch.from_numpy(rows[:0]).dtype, device=device)
    padded[:len(rows)] = torch.from_numpy(rows).to(device)
    tags = torch.full((longest,), -1, dtype=torch.int64, device=device)
    tags[:len(indices)] = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(device)
    all_rows = [torch.empty_like(padded) for _ in range(world_size())]
    all_tags = [torch.empty_like(tags) for _ in range(world_size())]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_tags, tags)
    rows_cat, tags_cat = torch.cat(all_rows).cpu(), torch.cat(all_tags).cpu()
    real = tags_cat >= 0
    if int(real.sum()) != num_samples or len(set(tags_cat[real].tolist())) != num_samples:
        raise RuntimeError(f"the ranks' shards do not cover the {num_samples} samples exactly once")
    ordered = torch.empty((num_samples, *rows.shape[1:]), dtype=rows_cat.dtype)
    ordered[tags_cat[real]] = rows_cat[real]
    return ordered.numpy()


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (gradients of per-rank loss sums), all in one all-reduce of their
    concatenation (tensors of one dtype and device); nothing with one process."""
    if not active() or not tensors:
        return
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    start = 0
    for tensor in tensors:
        tensor.copy_(flat[start:start + tensor.numel()].view_as(tensor))
        start += tensor.numel()
