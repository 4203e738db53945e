"""Who am I, who writes: the one place every stage asks about ranks, devices and collectives.

Works the same under `torchrun`, `accelerate launch` and a plain single process (where every collective is a
no-op and this process is the main one). The process group is created once, by `init()`, through accelerate's
`PartialState`, so the Trainers that come later reuse it (gloo on CPU, NCCL on GPUs).

Rules the stages follow (see docs/distributed.md):
- only `is_main()` writes or deletes files other ranks may read (manifest, outputs, shared work folders);
- every collective sits at a point that every rank reaches;
- after the main rank publishes something the others read, all meet at `barrier()`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Long enough for a held-out evaluation or a checkpoint write on one rank while the others wait.
DEFAULT_TIMEOUT = datetime.timedelta(hours=2)


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def init(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> None:
    """Create the process group (once) when launched with several processes; a no-op for one process.

    Called at CLI start, before any Trainer: the Trainers' own set-up then finds the group and keeps it (and
    its long timeout). Without GPUs the group is gloo (accelerate's MULTI_CPU), as `use_cpu` asks of the
    Trainers (`stage.trainer_arguments`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)


def device():
    """This rank's device: its own GPU (`cuda:LOCAL_RANK`) when there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` as rank `src` has it, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. "time to save", "a signal arrived")."""
    return any(gather_objects(bool(flag)))


def shard(items: list[T]) -> list[T]:
    """This rank's share of `items` (round-robin), so that the ranks together cover each item once."""
    return items[rank() :: world_size()]


def sharded_map(fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
    """`fn` over this rank's `shard(items)`; every rank gets all results, in the order of `items`.

    For work on a full model replica (held-out evaluation under DDP): N ranks do 1/N each, and the result
    is the one process's, as long as `fn` treats each item on its own.
    """
    mine = fn(shard(items))
    if len(mine) != len(shard(items)):
        raise ValueError(f"sharded_map: fn returned {len(mine)} results for {len(shard(items))} items")
    out: list[Any] = [None] * len(items)
    n = world_size()
    for r, part in enumerate(gather_objects(mine)):
        out[r::n] = part
    return out


@contextlib.contextmanager
def main_writes() -> Iterator[bool]:
    """`with main_writes() as writer: if writer: ...` — the main rank writes, then every rank meets."""
    try:
        yield is_main()
    finally:
        barrier()


def rank_label() -> str:
    """'rank 1 of 2: ' under several processes, '' for one: the prefix of a rank's one-line error."""
    return f"rank {rank()} of {world_size()}: " if is_distributed() else ""
