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


@pytest.mark.parametrize("window", [8, None])
def test_grpo_stage_runs(tmp_path, demo_tokenizer, demo_tokenizer_dir, window):
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
                "max_steps": 2, "max_completion_length": 3, "logging_steps": 1, "dtype": "float32",
                "ordering_window": window}]}
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
    assert m["ordering_overhead_pct"] > 0 and 0 < m["ordering_overhead_seconds"] < m["ordering_seconds"]
    # 2 steps of 2 queries x 2 samples. A window samples only what the run will train on; the whole-set round
    # samples all 8 queries, and training never reaches half of them.
    drawn = (m["ordering_samples_drawn"], m["ordering_samples_trained_on"], m["rollouts_for_ordering_only"])
    assert drawn == ((8, 8, 0) if window else (16, 8, 8))
    ranked = sorted(e["query_id"] for e in artifact["rounds"][0]["queries"])
    assert ranked == (list(range(4)) if window else list(range(8)))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/reward_model/mean" in r and "rewards/verifier/std" in r for r in logged)
    assert any("ordering_seconds" in r for r in logged)


def _verifier_grpo_recipe(tmp_path, tokenizer_dir, n_queries: int, **options):
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"}], "verifier": "exact",
             "answer": str(2 * i)} for i in range(n_queries)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = {"name": "grpo", "kind": "grpo", "data": {"sources": [{"path": "q.jsonl"}]},
             "rewards": [{"kind": "verifier"}], "order_by_reward_variance": False, "num_generations": 2,
             "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 2,
             "max_completion_length": 3, "logging_steps": 1, "dtype": "float32", **options}
    raw = {"model": "tiny", "tokenizer": str(tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [stage]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def test_a_query_set_smaller_than_one_generation_batch_is_refused_before_training(tmp_path, demo_tokenizer_dir):
    from qwen_align.errors import UserError

    # 16 per device x 1 process / 2 generations = 8 queries per generation batch; 5 give no step at all.
    recipe = _verifier_grpo_recipe(tmp_path, demo_tokenizer_dir, 5, per_device_train_batch_size=16)
    with pytest.raises(UserError, match=r"5 queries, but one generation batch takes 8"):
        run_recipe(recipe)
    assert not (tmp_path / "run" / "grpo" / "checkpoints").exists()


def test_kl_from_a_preset_start_keeps_the_start_as_reference(tmp_path, demo_tokenizer_dir):
    # TRL rebuilds the KL reference from the policy's checkpoint path; a preset has none.
    recipe = _verifier_grpo_recipe(tmp_path, demo_tokenizer_dir, 4, beta=0.04)
    entry = run_recipe(recipe)["stages"]["grpo"]
    assert entry["status"] == "completed" and entry["metrics"]["train_steps"] == 2
    reference = load_model(str(tmp_path / "run" / "grpo" / "reference"), "policy")
    start = load_model("tiny", "policy", tokenizer=load_tokenizer_dir(demo_tokenizer_dir), seed=0)
    for (name, a), (_, b) in zip(reference.state_dict().items(), start.state_dict().items()):
        assert torch_equal(a, b), name
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r for r in logged if "loss" in r)  # TRL logs the KL term only when it has a reference


def load_tokenizer_dir(path):
    from qwen_align.tokenizer import load_tokenizer

    return load_tokenizer(path)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
