"""Launched by tests/test_online_merging_sharded.py with `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

Every rank runs OnDARE and OnTIES on FSDP2-sharded parameters (`fully_shard`, uneven row counts, a shard with
no rows) with the same gradients on every rank; rank 0 also runs the same steps unsharded (plain tensors, the
one-process path) and compares the gathered parameters. Then τ_r built shard by shard from a sharded
safetensors base is compared with the whole-model τ_r. Rank 0 writes the findings to argv[1] as JSON.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from dpo import merge_shards
from dpo.merge_shards import layout, like_param, local
from dpo.online_merging import OnDARE, OnTIES, compute_sft_delta, load_base_state

STEPS = 5
merge_shards.MASK_BLOCK = 8  # small blocks: masks cut across blocks and across the shard boundary


class Uneven(torch.nn.Module):
    """Row counts 9, 7, 7, 5, 3, 1: on 2 ranks 5/4, 4/3, 3/2, 2/1 and 1/0 (an empty shard)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(9, 6)
        self.up = torch.nn.Linear(6, 7)
        self.down = torch.nn.Linear(7, 5, bias=False)
        self.gain = torch.nn.Parameter(torch.ones(3))
        self.scalar_row = torch.nn.Parameter(torch.full((1, 4), 0.5))


def quantised(shape, generator, scale=0.25):
    """Few distinct magnitudes (exact ties at every top-p threshold) and zeros."""
    return torch.randint(-3, 4, shape, generator=generator).float() * scale


def make_base(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    base = {n: p.detach() - quantised(p.shape, g, 0.125) for n, p in model.named_parameters()}
    base["gain"] = torch.full((3,), 0.5)  # τ_r = [0.5, 0.5, 0.5]: a three-way tie across the two shards
    return base


def run_steps(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for name, p in model.named_parameters():
            full = quantised(p.shape, g)
            rows = layout(name, p).rows
            p.grad = like_param(full if p.dim() == 0 else full[rows[0]:rows[1]].clone(), p)
        opt.step()
        opt.zero_grad()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def compare(sharded: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per tensor: how many entries differ (bit-exact comparison)."""
    return {n: int((sharded[n] != whole[n]).sum()) for n in whole}


def optimizer_checks(findings: dict) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    template = Uneven()
    base = make_base(template)
    settings = dict(lr=0.05, weight_decay=0.1, reserve_rate=0.3, merge_alpha=0.25, seed=3)
    for name, cls, extra in (("ondare", OnDARE, {}), ("onties", OnTIES, {}), ("onties_k2", OnTIES, {"merge_every": 2}),
                             ("ondare_rescale", OnDARE, {"rescale": True, "merge_every": 2})):
        sharded = copy.deepcopy(template)
        fully_shard(sharded)
        opt = cls(sharded.named_parameters(), base, **settings, **extra)
        run_steps(sharded, opt, STEPS)
        gathered = {n: full(p.detach()) for n, p in sharded.named_parameters()}
        local_rows = {n: list(local(p).shape[:1]) for n, p in sharded.named_parameters()}
        if rank == 0:
            single = copy.deepcopy(template)
            ref = cls(single.named_parameters(), base, **settings, **extra)
            run_steps(single, ref, STEPS)
            want = {n: p.detach() for n, p in single.named_parameters()}
            moved = sum(int((want[n] != p.detach()).sum()) for n, p in template.named_parameters())
            findings[name] = {"differing": compare(gathered, want), "moved_entries": moved,
                              "rank0_rows": local_rows}
            if name == "onties":
                findings["_onties_want"] = want

    # As under accelerate + the Trainer: the optimizer is created on the unsharded model, then the model is
    # sharded and the optimizer's params are swapped for the DTensors by name (fsdp2_switch_optimizer_parameters).
    late = copy.deepcopy(template)
    opt = OnTIES(late.named_parameters(), base, **settings)
    fully_shard(late)
    sharded_by_name = dict(late.named_parameters())
    for group in opt.param_groups:
        group["params"] = [sharded_by_name[n] for n in group["param_names"]]
    run_steps(late, opt, STEPS)
    gathered = {n: full(p.detach()) for n, p in late.named_parameters()}
    if rank == 0:
        findings["created_before_sharding"] = {"differing": compare(gathered, findings.pop("_onties_want"))}

    # Resume under sharding through torch.distributed.checkpoint (the path accelerate's FSDP2 checkpoints take).
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    a, b = copy.deepcopy(template), copy.deepcopy(template)
    fully_shard(a)
    fully_shard(b)
    opt_a = OnDARE(a.named_parameters(), base, **settings)
    run_steps(a, opt_a, 3)
    saved = copy.deepcopy(get_optimizer_state_dict(a, opt_a))  # as if written to disk: no shared tensors
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            local(pb).copy_(local(pa))
    opt_b = OnDARE(b.named_parameters(), make_base(Uneven()), **settings)  # another base: the saved τ_r must win
    opt_b.initialize_state()  # as the trainer does before loading (DCP's own init would be a step)
    set_optimizer_state_dict(b, opt_b, saved)
    run_steps(a, opt_a, 2, seed=5)
    run_steps(b, opt_b, 2, seed=5)
    resumed = {n: full(p.detach()) for n, p in b.named_parameters()}
    uninterrupted = {n: full(p.detach()) for n, p in a.named_parameters()}
    if rank == 0:
        findings["resume"] = {"differing": compare(resumed, uninterrupted)}


def sft_delta_checks(findings: dict, folder: str) -> None:
    """τ_r from a sharded safetensors base, shard by shard, against the whole-model τ_r."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(1)
    base_model = Qwen2ForCausalLM(config)
    if dist.get_rank() == 0:
        base_model.save_pretrained(folder, max_shard_size="30KB")
    dist.barrier()
    torch.manual_seed(2)
    policy = Qwen2ForCausalLM(config)  # "the SFT model": other weights, same shapes
    whole = compute_sft_delta(policy.named_parameters(), load_base_state(base_model.state_dict()))
    sharded = copy.deepcopy(policy)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    opt = OnTIES(sharded.named_parameters(), folder, reserve_rate=0.1, merge_alpha=0.1)
    opt.state_dict()  # builds τ_r
    named = dict(sharded.named_parameters())
    local_ok = all(tuple(local(opt.state[p]["sft_delta"]).shape) == tuple(local(p).shape) for p in named.values())
    gathered = {n: full(opt.state[p]["sft_delta"]) for n, p in named.items()}
    norm = opt.sft_delta_norm()
    if dist.get_rank() == 0:
        import os

        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        findings["sft_delta"] = {"differing": compare(gathered, whole), "local_shapes": local_ok,
                                 "files": len(files), "norm": norm,
                                 "whole_norm": float(torch.sqrt(sum(t.pow(2).sum() for t in whole.values())))}


def layout_refusal(findings: dict) -> None:
    """A parameter sharded on dim 1 (as tensor parallelism would) stops with one line naming it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from qwen_align.errors import UserError

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
    weight.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    opt = OnTIES([("col_sharded.weight", weight)], sft_delta={"col_sharded.weight": torch.zeros(4, 6)})
    try:
        opt.step()
        findings["refusal"] = None
    except UserError as e:
        findings["refusal"] = str(e)


def main() -> None:
    dist.init_process_group("gloo")
    findings: dict = {"world_size": dist.get_world_size()}
    layout_refusal(findings)
    optimizer_checks(findings)
    sft_delta_checks(findings, sys.argv[2])
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            json.dump(findings, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
