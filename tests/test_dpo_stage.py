"""The dpo stage end to end on the tiny preset: SFT -> DPO with online merging, metrics, resume, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from helpers import write_jsonl
from safetensors.torch import load_file

from qwen_align.errors import RecipeError, UserError
from qwen_align.recipe import load_recipe
from qwen_align.runner import run_recipe


def pair_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 10 + i, 20 + 3 * i
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": str(a + b + 1)}],
        })
    return rows


@pytest.fixture
def dpo_recipe(small_sft_recipe, tmp_path):
    """The 2-step SFT recipe plus a dpo stage on 12 hand-made pairs (3 held out), 3 steps, OnDARE."""
    path, raw = small_sft_recipe
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
    raw["stages"].append({
        "name": "dpo", "kind": "dpo", "init_from": "sft",
        "data": {"sources": [{"path": str(pairs)}]},
        "task_eval": raw["stages"][0]["task_eval"],
        "eval_fraction": 0.25,
        "max_length": 64, "per_device_train_batch_size": 3, "max_steps": 3, "save_steps": 1, "logging_steps": 1,
        "learning_rate": 1e-3, "reserve_rate": 0.5, "merge_alpha": 0.01, "nll_weight": 1.0, "dtype": "float32",
    })
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path, raw


def test_dpo_stage_runs_records_and_resumes_identically(dpo_recipe):
    path, raw = dpo_recipe
    entry = run_recipe(load_recipe(path))["stages"]["dpo"]
    assert entry["status"] == "completed", entry.get("error")
    m = entry["metrics"]
    assert m["train_steps"] == 3 and m["data"]["train_pairs"] == 9 and m["data"]["eval_pairs"] == 3
    assert m["optimizer"] == {"optimizer": "online_merging", "variant": "ondare", "reserve_rate": 0.5,
                              "merge_alpha": 0.01, "rescale": False, "merge_every": 1, "seed": 0}
    assert m["loss_type"] == ["sigmoid", "sft"] and m["loss_weights"] == [1.0, 1.0]
    assert m["heldout_pairs"]["before"]["pair_accuracy"] == 0.5  # policy == reference: every margin is 0
    after = m["heldout_pairs"]["after"]  # measured on the trained policy: its margins are no longer all zero
    assert after["pairs"] == 3 and after["reward_margin"] != 0 and after["pair_accuracy"] * 3 in (0, 1, 2, 3)
    run_dir = path.parent / "run"
    optimizer_state = torch.load(run_dir / "dpo" / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert optimizer_state["online_merging"]["variant"] == "ondare"
    assert all("sft_delta" in s for s in optimizer_state["state"].values())
    finished = load_file(run_dir / "dpo" / "final" / "model.safetensors")

    # Interrupt after step 2: drop the last checkpoint and mark the stage interrupted; the rerun resumes.
    shutil.rmtree(run_dir / "dpo" / "checkpoints" / "checkpoint-3")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["dpo"]["status"] = "interrupted"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    again = run_recipe(load_recipe(path))["stages"]["dpo"]
    assert again["status"] == "completed" and again["resumed_from"].endswith("checkpoint-2")
    resumed = load_file(run_dir / "dpo" / "final" / "model.safetensors")
    for name, tensor in finished.items():
        assert torch.equal(tensor, resumed[name]), name


def test_preset_base_rebuilds_the_sft_start(small_sft_recipe, demo_tokenizer):
    """The recipe's preset + seed gives exactly the weights SFT started from: with a vanishing LR, τ_r = 0."""
    from transformers import AutoModelForCausalLM

    from dpo.online_merging import compute_sft_delta

    path, raw = small_sft_recipe
    stage = raw["stages"][0]
    stage.update(max_steps=1, learning_rate=1e-30, lr_scheduler_type="constant", lr_scheduler_kwargs={})
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    entry = run_recipe(load_recipe(path))["stages"]["sft"]
    sft = AutoModelForCausalLM.from_pretrained(entry["output"])
    delta = compute_sft_delta(sft.named_parameters(), "tiny", tokenizer=demo_tokenizer, seed=raw["seed"])
    assert max(t.abs().max().item() for t in delta.values()) < 1e-20  # only the 1e-30-sized step itself
    other_seed = compute_sft_delta(sft.named_parameters(), "tiny", tokenizer=demo_tokenizer, seed=raw["seed"] + 1)
    assert max(t.abs().max().item() for t in other_seed.values()) > 0.01


def test_dpo_without_data_fails_clearly(small_sft_recipe):
    path, raw = small_sft_recipe
    raw["stages"].append({"name": "dpo", "kind": "dpo", "init_from": "sft", "max_steps": 1})
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: stages\[1\].data: required key is missing"):
        load_recipe(path)
