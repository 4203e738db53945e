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
from dataclasses import dataclass
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


# ---------------------------------------------------------------- which backend the launcher set up


@dataclass(frozen=True)
class Backend:
    """How the processes share the model: what `qwen-align plan` prints and the stages ask."""

    kind: str  # "single" | "ddp" | "fsdp" | "fsdp2" | "deepspeed"
    world_size: int
    zero_stage: int | None = None  # DeepSpeed only
    activation_checkpointing: bool = False  # FSDP's own (then the Trainer must not add its own)
    source: str = "environment"  # where it was read: the launcher's environment, or an accelerate config file

    def describe(self) -> str:
        name = {"single": "single process", "ddp": "DDP", "fsdp": "FSDP (v1)", "fsdp2": "FSDP2",
                "deepspeed": f"DeepSpeed ZeRO-{self.zero_stage}"}[self.kind]
        checkpointing = ", FSDP activation checkpointing" if self.activation_checkpointing else ""
        return f"{name}{checkpointing}, world size {self.world_size} (from {self.source})"


def _flag(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def launch_backend(env: dict[str, str] | None = None) -> Backend:
    """The backend of this launch, from the variables `accelerate launch` / `torchrun` set."""
    env = os.environ if env is None else env
    size = int(env.get("WORLD_SIZE", "1"))
    if _flag(env.get("ACCELERATE_USE_DEEPSPEED")):
        return Backend("deepspeed", size, int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")))
    if _flag(env.get("ACCELERATE_USE_FSDP")):
        return Backend("fsdp2" if env.get("FSDP_VERSION", "1") == "2" else "fsdp", size,
                       activation_checkpointing=_flag(env.get("FSDP_ACTIVATION_CHECKPOINTING")))
    return Backend("ddp" if size > 1 else "single", size)


def config_backend(path: str) -> Backend:
    """The backend an accelerate config file sets up (read with accelerate's own loader)."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    from .errors import UserError

    if not os.path.isfile(path):
        raise UserError(f"{path}: accelerate config not found")
    try:
        config = load_config_from_file(path)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not an accelerate config ({problem})") from None
    kind = str(getattr(config.distributed_type, "value", config.distributed_type))
    size = max(1, int(config.num_processes or 1))
    source = f"accelerate config {path}"
    if kind == "DEEPSPEED":
        return Backend("deepspeed", size, zero_stage=int((config.deepspeed_config or {}).get("zero_stage", 2)),
                       source=source)
    if kind == "FSDP":
        fsdp = config.fsdp_config or {}
        return Backend("fsdp2" if int(fsdp.get("fsdp_version", 1)) == 2 else "fsdp", size, source=source,
                       activation_checkpointing=bool(fsdp.get("fsdp_activation_checkpointing")))
    return Backend("ddp" if size > 1 else "single", size, source=source)


def allow_fsdp_on_cpu() -> None:
    """Let an FSDP launch run on CPU processes over gloo (the tests' and a laptop's FSDP2).

    accelerate 1.15 turns FSDP on only for GPU-like distributed types (`AcceleratorState.__init__`): without a GPU
    the state comes up MULTI_CPU and the FSDP plugin is dropped, so each rank would train a DDP replica instead.
    This promotes that state to FSDP with its plugin; torch's `fully_shard` itself runs on a CPU mesh.
    """
    import torch

    if torch.cuda.is_available() or launch_backend().kind not in ("fsdp", "fsdp2"):
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "promotes_cpu_fsdp", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate's own init does

    __init__.promotes_cpu_fsdp = True
    AcceleratorState.__init__ = __init__
