"""Online merging under FSDP2: 2 real gloo processes against the one-process run, bit for bit.

One `torch.distributed.run --nproc_per_node 2` launch (tests/online_merging_sharded_run.py) does every check;
the tests below read its findings. Bit-exact is the right bar: after the masks, every operation is elementwise
on the same float32 values in the same order, so any difference is a wrong mask, shard offset or tie.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo.merge_shards import ShardLayout, block_random_mask, kth_largest_bits, top_fraction_mask

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "online_merging_sharded_run.py"), str(out / "findings.json"), str(out / "base")]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "findings.json").read_text())


@pytest.mark.parametrize("run", ["ondare", "onties", "onties_k2", "ondare_rescale"])
def test_fsdp2_two_ranks_equal_one_process(findings, run):
    result = findings[run]
    assert findings["world_size"] == 2
    # uneven chunks and an empty shard on rank 1 (the 1-row tensor)
    assert result["rank0_rows"] == {"gain": [2], "scalar_row": [1], "embed.weight": [5], "up.weight": [4],
                                    "up.bias": [4], "down.weight": [3]}
    assert result["moved_entries"] > 100  # 5 steps moved the weights: the comparison is not of untouched ones
    assert result["differing"] == dict.fromkeys(result["differing"], 0)


def test_optimizer_created_before_sharding_as_the_trainer_does(findings):
    differing = findings["created_before_sharding"]["differing"]
    assert differing and differing == dict.fromkeys(differing, 0)


def test_fsdp2_resume_through_distributed_checkpoint(findings):
    differing = findings["resume"]["differing"]
    assert differing and differing == dict.fromkeys(differing, 0)


def test_sft_delta_from_sharded_safetensors_shard_by_shard(findings):
    result = findings["sft_delta"]
    assert result["files"] > 1  # the base really is a sharded checkpoint
    assert result["local_shapes"]  # each rank keeps τ_r for its own shard only
    assert result["differing"] == dict.fromkeys(result["differing"], 0)
    assert len(result["differing"]) == 27  # every Qwen2 parameter, lm_head (untied) included
    assert math.isclose(result["norm"], result["whole_norm"], rel_tol=1e-6)


def test_other_layouts_refused_in_one_line(findings):
    assert findings["refusal"] == (
        "online merging: parameter 'col_sharded.weight' is laid out as (Shard(dim=1),); the exact merges need "
        "parameters sharded on dim 0 over one mesh dimension (FSDP2's fully_shard, optionally replicated as HSDP)")


def test_sft_delta_from_a_checkpoint_folder_equals_the_state_dicts(tmp_path):
    """One `model.safetensors` read tensor by tensor; a tied base (no lm_head in the file) serves an untied policy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpo.online_merging import compute_sft_delta

    def tiny(seed, tie):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))

    base, policy = tiny(0, tie=True), tiny(1, tie=False)
    base.save_pretrained(tmp_path / "base")
    from_folder = compute_sft_delta(policy.named_parameters(), str(tmp_path / "base"))
    state = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    from_state = compute_sft_delta(policy.named_parameters(), state)
    assert from_folder.keys() == from_state.keys() and "lm_head.weight" in from_folder
    for name, tau in from_state.items():
        assert torch.equal(from_folder[name], tau), name
    assert torch.equal(from_folder["lm_head.weight"], (policy.lm_head.weight - base.model.embed_tokens.weight).detach())


def test_radix_select_finds_the_kthvalue_threshold():
    """The sharded threshold search, run with one shard: the same k-th largest as kthvalue, ties included."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(1000, generator=g), torch.randint(-2, 3, (999,), generator=g).float(),
             torch.tensor([0.0, 0.0, 1e-40, float("inf"), 3.0]), torch.zeros(7)]
    for x in cases:
        flat = x.abs()
        for k in (1, 2, len(flat) // 3, len(flat) - 1):
            bits, above = kth_largest_bits(flat.view(torch.int32), k)
            threshold = flat.kthvalue(len(flat) - k + 1).values
            assert torch.tensor(bits, dtype=torch.int32).view(torch.float32) == threshold
            assert above == int((flat > threshold).sum())


def test_block_masks_cut_from_the_whole_tensors_mask(monkeypatch):
    """Any split of a tensor into row blocks draws, block for block, the whole tensor's mask."""
    from dpo import merge_shards

    monkeypatch.setattr(merge_shards, "MASK_BLOCK", 16)
    x = torch.zeros(13, 5)
    args = (0.3, 4, "w", 7, "update")
    whole = block_random_mask(x, args[0], ShardLayout(numel=65, offset=0, rows=(0, 13)), *args[1:])
    assert 5 < int(whole.sum()) < 40
    parts = [block_random_mask(x[a:b], args[0], ShardLayout(numel=65, offset=a * 5, rows=(a, b)), *args[1:])
             for a, b in ((0, 3), (3, 4), (4, 4), (4, 13))]
    assert torch.equal(torch.cat(parts), whole)
    other_step = block_random_mask(x, 0.3, ShardLayout(numel=65, offset=0, rows=(0, 13)), 4, "w", 8, "update")
    assert not torch.equal(other_step, whole)


def test_unsharded_top_fraction_mask_unchanged():
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, -5.0])
    assert top_fraction_mask(x, 0.5, ShardLayout(numel=6, offset=0, rows=(0, 6))).tolist() == \
        [True, False, True, False, False, True]


def test_deepspeed_and_fsdp1_refused_in_one_line():
    from types import SimpleNamespace

    from dpo.trainer import refuse_unsupported_sharding
    from qwen_align.errors import UserError

    def trainer(deepspeed=False, fsdp_version=None):
        plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
        return SimpleNamespace(is_deepspeed_enabled=deepspeed, is_fsdp_enabled=plugin is not None,
                               accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))

    with pytest.raises(UserError, match=r"DeepSpeed \(ZeRO 1-3\) is not supported — .*flattened fp32 partition"):
        refuse_unsupported_sharding(trainer(deepspeed=True))
    with pytest.raises(UserError, match=r"FSDP1 is not supported — .*FlatParameter"):
        refuse_unsupported_sharding(trainer(fsdp_version=1))
    refuse_unsupported_sharding(trainer(fsdp_version=2))
    refuse_unsupported_sharding(trainer())
