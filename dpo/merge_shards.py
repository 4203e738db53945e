"""What the online merging optimizers need to give a sharded run (FSDP2) exactly the unsharded result.

FSDP2's `fully_shard` makes each parameter a DTensor sharded on dim 0 (`torch.chunk` rows, so the last ranks
may hold fewer rows or none). In flattened order, a rank's local shard is one contiguous range of the whole
tensor, and the ranks' ranges follow their mesh coordinate. Both sparsifiers are defined on the whole tensor:

- OnDARE's random masks are drawn block by block from counter-seeded generators (`block_random_mask`): each
  block of `MASK_BLOCK` flattened entries has its own seed from (seed, name, step, which mask, block index), so
  a rank draws only the blocks its range touches and keeps exactly the entries the unsharded run keeps. No
  communication, and no generator state to save: the step counter is the state.
- OnTIES's top-p threshold is the k-th largest magnitude of the whole tensor (`top_fraction_mask`): found by a
  radix select over the float32 bit pattern (4 all-reduced 256-bin histograms), ties at the threshold broken
  by global flattened position (one more all-reduce of per-rank tie counts).

Plain tensors (one process, or DDP replicas) take the local path with no collectives.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from qwen_align.errors import UserError

MASK_BLOCK = 1 << 22  # entries per OnDARE mask block: ~4M, so a 7B's largest tensor has ~130 blocks


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's local tensor lies in the whole one: flat entries [offset, offset + local numel)."""

    numel: int  # of the whole tensor
    offset: int
    rows: tuple[int, int]  # [start, stop) along dim 0
    group: object | None = None  # the process group the tensor is sharded over; None: not sharded
    coordinate: int = 0  # this rank's position along that group (the order of the shards)
    size: int = 1


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place writes land in the DTensor), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def like_param(local_tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`local_tensor` as state for `param`: a DTensor with the param's layout when the param is one."""
    if not is_dtensor(param):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def layout(name: str, p: torch.Tensor) -> ShardLayout:
    """The layout of parameter `name`; one UserError for a layout the exact merges cannot follow."""
    n = p.numel()
    if not is_dtensor(p):
        return ShardLayout(numel=n, offset=0, rows=(0, p.shape[0] if p.dim() else 1))
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded = [i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
    if len(sharded) > 1 or any(type(p.placements[i]) is not Shard or p.placements[i].dim != 0 for i in sharded):
        raise UserError(
            f"online merging: parameter '{name}' is laid out as {tuple(p.placements)}; the exact merges need "
            "parameters sharded on dim 0 over one mesh dimension (FSDP2's fully_shard, optionally replicated as HSDP)"
        )
    local_shape, offsets = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row_size = math.prod(p.shape[1:])
    start = offsets[0] if p.dim() else 0
    stop = start + (local_shape[0] if p.dim() else 1)
    if not sharded:
        return ShardLayout(numel=n, offset=0, rows=(start, stop))
    mesh, dim = p.device_mesh, sharded[0]
    return ShardLayout(numel=n, offset=start * row_size, rows=(start, stop), group=mesh.get_group(dim),
                       coordinate=mesh.get_local_rank(dim), size=mesh.size(dim))


def _all_reduce(t: torch.Tensor, shard: ShardLayout) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, group=shard.group)
    return t


# ---------------------------------------------------------------- OnTIES: exact top-p of the whole tensor


def top_fraction_mask(x: torch.Tensor, fraction: float, shard: ShardLayout | None = None) -> torch.Tensor:
    """Boolean mask keeping exactly ceil(fraction·n) entries of largest |x| (at least one) of the whole tensor
    (`x` is this rank's part when `shard` is sharded); ties at the threshold are broken by flattened position
    (first ones kept). One process: `kthvalue`; sharded: a radix select with all-reduced counts, the same entries."""
    return mask_from_cut(x, top_fraction_cut(x, fraction, shard))


def top_fraction_cut(x: torch.Tensor, fraction: float, shard: ShardLayout | None = None) -> tuple[int, int] | None:
    """Where top_fraction_mask cuts: (bit pattern of the threshold magnitude, how many of this part's entries
    tied at the threshold are kept), or None to keep everything. Collectives only when `shard` is sharded."""
    sharded = shard is not None and shard.group is not None
    n = shard.numel if sharded else x.numel()
    k = min(n, max(1, math.ceil(fraction * n)))
    if k == n:
        return None
    bits = _magnitude_bits(x)
    if not sharded:
        threshold = bits.kthvalue(n - k + 1).values  # the k-th largest magnitude (int order = float order)
        return int(threshold), k - int((bits > threshold).sum())
    threshold, above = kth_largest_bits(bits, k, lambda c: _all_reduce(c, shard))
    # Ties: the first `k - above` in global order. Shards follow their coordinate, so this rank's share of the
    # tie budget is what is left after the tied entries of the shards before it.
    ties = torch.zeros(shard.size, dtype=torch.int64, device=x.device)
    ties[shard.coordinate] = int((bits == threshold).sum())
    ties_before = int(_all_reduce(ties, shard)[: shard.coordinate].sum())
    return threshold, k - above - ties_before


def mask_from_cut(x: torch.Tensor, cut: tuple[int, int] | None) -> torch.Tensor:
    if cut is None:
        return torch.ones_like(x, dtype=torch.bool)
    threshold, budget = cut
    bits = _magnitude_bits(x)
    at_threshold = bits == threshold
    keep = (bits > threshold) | (at_threshold & (at_threshold.cumsum(0) <= budget))
    return keep.view_as(x)


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| flattened as float32 bit patterns: for non-negative floats their order is the values' order."""
    return x.detach().float().abs().flatten().view(torch.int32)


RADIX_DIGITS = ((23, 8), (15, 8), (7, 8), (0, 7))  # (shift, width): the 31 bits of a non-negative float32


def kth_largest_bits(bits: torch.Tensor, k: int, count=lambda c: c) -> tuple[int, int]:
    """Radix select of the bit pattern T of the k-th largest of non-negative float32s given as int32 `bits`
    (their order is the floats' order), 8 bits at a time from the top: 4 histograms of the next digit among the
    entries that match the digits found so far. `count` turns a local histogram into the global one (an
    all-reduce when sharded: 4 per search). Returns (T, #(bits > T))."""
    prefix, prefix_mask, above = 0, 0, 0
    for shift, width in RADIX_DIGITS:
        candidates = bits[(bits & prefix_mask) == prefix] if prefix_mask else bits
        digits = ((candidates >> shift) & ((1 << width) - 1)).long()
        hist = count(torch.bincount(digits, minlength=1 << width))
        from_top = hist.flip(0).cumsum(0)  # from_top[i]: candidates whose digit is >= (2^width − 1 − i)
        i = int(torch.searchsorted(from_top, k - above))  # the first i with from_top[i] >= k − above
        digit = (1 << width) - 1 - i
        above += int(from_top[i] - hist[digit])  # candidates with a larger digit: all above T
        prefix |= digit << shift
        prefix_mask |= ((1 << width) - 1) << shift
    return prefix, above


# ---------------------------------------------------------------- OnDARE: counter-seeded random masks


def block_seed(seed: int, name: str, step: int, which: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{step}/{which}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def block_random_mask(x: torch.Tensor, keep: float, shard: ShardLayout, seed: int, name: str, step: int,
                      which: str) -> torch.Tensor:
    """Keep each entry with probability `keep`: the part covering this shard of the mask the whole tensor gets.
    A block is always drawn whole (its length depends only on the whole tensor), then cut to the shard."""
    if keep >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    start, stop = shard.offset, shard.offset + x.numel()
    parts = []
    generator = torch.Generator(device=x.device)
    for block in range(start // MASK_BLOCK, -(-stop // MASK_BLOCK)):
        lo, hi = block * MASK_BLOCK, min((block + 1) * MASK_BLOCK, shard.numel)
        generator.manual_seed(block_seed(seed, name, step, which, block))
        draw = torch.rand(hi - lo, generator=generator, device=x.device)
        parts.append(draw[max(start, lo) - lo: min(stop, hi) - lo])
    if not parts:  # an empty shard
        return torch.zeros_like(x, dtype=torch.bool)
    return (torch.cat(parts) < keep).view_as(x)
