"""What sharding costs the online merging optimizers: step time and collectives, FSDP2 vs one process.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 benchmarks/online_merging_sharded.py \
        [--layers 4] [--hidden 256] [--steps 5]

A stack of `--layers` square Linear layers (hidden × hidden weights and biases), each `fully_shard`ed, with fixed
gradients; every rank times `optimizer.step()` of OnDARE, OnTIES and AdamW (p = 0.01, α = 1e-7) on its shard,
and rank 0 also times the same steps unsharded in its own process. Collectives are counted by wrapping
`torch.distributed.all_reduce`. Prints one line per optimizer to paste into docs/online_merging.md.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from dpo.online_merging import OnDARE, OnTIES


def build(layers: int, hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])


class CountAllReduce:
    def __init__(self):
        self.calls, self._orig = 0, dist.all_reduce

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def timed_steps(model, opt, steps: int) -> tuple[float, int]:
    """Seconds per step and all-reduces per step, after a first (untimed) step."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    for p, grad in zip(model.parameters(), grads):
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import Shard, distribute_tensor

            p.grad = distribute_tensor(grad, p.device_mesh, [Shard(0)])
        else:
            p.grad = grad
    opt.step()  # the first step also builds τ_r (and OnTIES's τ_r cut): not timed
    with CountAllReduce() as counter:
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        elapsed = time.perf_counter() - start
    return elapsed / steps, counter.calls // steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    template = build(args.layers, args.hidden)
    base = {n: p.detach() - 0.01 for n, p in template.named_parameters()}
    settings = dict(lr=1e-3, reserve_rate=0.01, merge_alpha=1e-7)
    tensors = len(list(template.parameters()))
    for name, make in (("adamw", None), ("ondare", OnDARE), ("onties", OnTIES)):
        sharded = copy.deepcopy(template)
        for layer in sharded:
            fully_shard(layer)
        fully_shard(sharded)
        if make is None:
            opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3, foreach=False)
        else:
            opt = make(sharded.named_parameters(), base, **settings)
        sharded_s, per_step = timed_steps(sharded, opt, args.steps)
        if rank == 0:
            single = copy.deepcopy(template)
            ref = (torch.optim.AdamW(single.parameters(), lr=1e-3, foreach=False) if make is None
                   else make(single.named_parameters(), base, **settings))
            single_s, _ = timed_steps(single, ref, args.steps)
            print(f"{name}: {args.layers} layers x {args.hidden}^2 ({tensors} tensors) — one process "
                  f"{single_s * 1e3:.1f} ms/step; FSDP2 on {world} ranks {sharded_s * 1e3:.1f} ms/step, "
                  f"~{per_step} all-reduces/step after the first", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
