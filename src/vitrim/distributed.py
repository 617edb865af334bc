"""Many processes under ``torchrun``: one process group, one device per ``LOCAL_RANK``.

``torchrun --nproc_per_node N -m vitrim train|prune|eval ...`` takes the same arguments as one
process. :func:`init_from_env` joins the group when ``WORLD_SIZE`` > 1 (``env://``; gloo on the
CPU, NCCL on CUDA); everything else here is a no-op in one process, so the library calls it
unconditionally: :func:`all_reduce_sum` before a search or a solve makes every rank agree,
:func:`shard` splits an index list exactly (no image dropped or repeated), and file writes happen
where :func:`is_main` holds, the other ranks waiting at :func:`barrier`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from vitrim.errors import ConfigError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def local_world_size() -> int:
    """How many processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), sharing its memory
    and cores; 1 outside torchrun."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: str | torch.device | None = "auto") -> torch.device:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), once; the device of this rank.

    The backend is NCCL when the resolved device is CUDA (each rank on ``cuda:LOCAL_RANK``), gloo
    otherwise. In one process (no ``WORLD_SIZE``, or 1) nothing is initialised and the device is
    simply :func:`vitrim.device.resolve_device`'s.
    """
    from vitrim.device import resolve_device

    resolved = resolve_device(device)
    if _env_int("WORLD_SIZE", 1) <= 1:
        return resolved
    local = _env_int("LOCAL_RANK", 0)
    if resolved.type == "cuda":
        resolved = resolve_device(f"cuda:{local}")
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return resolved


def leave(wait: bool = True) -> None:
    """Leave the process group this process joined (a no-op when it joined none).

    With ``wait`` every rank first meets at a barrier, so none tears its connections down while
    another still talks to it; a rank that failed passes ``wait=False`` (the others may be inside a
    different collective). Leaving it to interpreter exit lets gloo's threads be destroyed while
    still running: the process aborts (``terminate called without an active exception``) after
    its work succeeded."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 in one process)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes take part (1 in one process)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this is rank 0, the process that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (a no-op in one process)."""
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place, and return it (unchanged in one process).

    The tensor may live on any device: it is staged through the backend's (CUDA for NCCL, the
    CPU for gloo) when it is elsewhere."""
    if not active():
        return tensor
    on_gpu = dist.get_backend() == "nccl"
    if on_gpu and not tensor.is_cuda:  # NCCL reduces CUDA tensors only
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        tensor.copy_(staged)
    elif not on_gpu and tensor.device.type != "cpu":  # gloo: through the CPU
        staged = tensor.cpu()
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank (``value`` itself in one process)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: object) -> list[object]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` in one process)."""
    if not active():
        return [value]
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def main_lock(target: str | os.PathLike[str]) -> contextlib.AbstractContextManager[None]:
    """:func:`vitrim.fsutil.output_lock` on ``target`` held by rank 0, the rank that writes; nothing
    on the others (their lock would refuse the run)."""
    from vitrim.fsutil import output_lock

    return output_lock(target) if is_main() else contextlib.nullcontext()


def shard(indices: Sequence[int] | torch.Tensor, rank_: int | None = None,
          world: int | None = None) -> Sequence[int] | torch.Tensor:
    """This rank's contiguous share of ``indices``: every index lands on exactly one rank, the first
    ``len % world`` ranks getting one more (no padding, nothing dropped), so sums over the shards
    all-reduced equal the single-process sum."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n = len(indices)
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return indices[start:start + base + (1 if r < extra else 0)]


def strided_shard(indices: Sequence[int] | torch.Tensor, rank_: int | None = None,
                  world: int | None = None) -> Sequence[int] | torch.Tensor:
    """Every ``world``-th index from ``rank`` on (``DistributedSampler``'s split of a global batch):
    rank r of a global batch of B*world images takes images r, r+world, ..."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return indices[r::w]


__all__ = ["active", "all_gather_object", "all_reduce_sum", "barrier", "broadcast_object", "init_from_env", "is_main",
           "leave", "main_lock", "rank", "shard", "strided_shard", "world_size"]
