"""The GRPO stage end to end through the runner: reward model from an earlier stage, verifier, ordering
artifact, held-out accuracy before and after, overhead in the manifest."""

from __future__ import annotations

import json

import pytest
import yaml

from qwen_align.fsutil import atomic_write_json
from qwen_align.model import load_model, save_checkpoint
from qwen_align.recipe import load_recipe, stage_hash
from qwen_align.runner import run_recipe


def test_grpo_stage_runs(tmp_path, demo_tokenizer, demo_tokenizer_dir):
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"}], "verifier": "exact",
             "answer": str(2 * i)} for i in range(8)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A completed reward_model stage in the manifest, as the runner leaves it.
    rm_dir = save_checkpoint(load_model("tiny", "reward", tokenizer=demo_tokenizer, seed=1), demo_tokenizer,
                             tmp_path / "run" / "rm" / "final")
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [
               {"name": "rm", "kind": "reward_model", "data": {"sources": [{"path": "q.jsonl"}]}},
               {"name": "grpo", "kind": "grpo", "data": {"sources": [{"path": "q.jsonl"}]},
                "task_eval": {"path": "q.jsonl", "max_new_tokens": 3},
                "rewards": [{"kind": "reward_model", "weight": 0.5}, {"kind": "verifier"}],
                "num_generations": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                "max_steps": 2, "max_completion_length": 3, "logging_steps": 1, "dtype": "float32"}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    rm_hash = stage_hash(recipe, recipe.stages[0], None)  # what the runner records for an up-to-date stage
    atomic_write_json(tmp_path / "run" / "manifest.json", {"stages": {"rm": {
        "status": "completed", "output": str(rm_dir), "kind": "reward_model", "config_hash": rm_hash}}})
    manifest = run_recipe(recipe, only=["grpo"])
    entry = manifest["stages"]["grpo"]
    assert entry["status"] == "completed"
    m = entry["metrics"]
    assert m["train_steps"] == 2 and m["samples_consumed"] == 8
    assert "heldout_accuracy_before" in m and "heldout_accuracy" in m
    artifact = json.loads((tmp_path / "run" / "grpo" / "ordering.json").read_text())
    # The round was timed (a rollout takes time), and the manifest reports what the artifact recorded.
    assert m["ordering_rounds"] == len(artifact["rounds"]) == 1
    assert m["ordering_seconds"] > 0 and m["ordering_seconds"] == pytest.approx(artifact["ordering_seconds"], abs=0.01)
    assert m["ordering_overhead_pct"] > 0
    assert sorted(e["query_id"] for e in artifact["rounds"][0]["queries"]) == list(range(8))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/reward_model/mean" in r and "rewards/verifier/std" in r for r in logged)
    assert any("ordering_seconds" in r for r in logged)
