"""GRPO stage options: TRL's loss types, the batch arithmetic `plan` shows, recipe-level refusals."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from grpo.config import LOSS_TYPES, Config
from qwen_align.errors import RecipeError
from qwen_align.recipe import validate_recipe


def recipe(tmp_path, num_processes=1, **grpo):
    data = tmp_path / "q.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1?"}], "verifier": "exact", "answer": "2"}\n')
    raw = {
        "model": "tiny", "run_dir": str(tmp_path / "run"), "num_processes": num_processes,
        "stages": [
            {"name": "rm", "kind": "reward_model", "data": {"sources": [{"path": str(data)}]}},
            {"name": "grpo", "kind": "grpo", **grpo},
        ],
    }
    return validate_recipe(raw, "recipe.yaml")


def test_loss_types_are_trls():
    from trl import GRPOConfig

    help_text = next(f for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type").metadata["help"]
    listed = help_text.split("Supported values are")[1].split(".")[0]
    assert {t.strip(" '") for t in listed.replace(" and ", ",").split(",") if t.strip(" '")} == set(LOSS_TYPES)
    assert Config(name="g").loss_type == "grpo"
    with pytest.raises(ValidationError, match="not one of TRL's"):
        Config(name="g", loss_type="ppo")


def test_report_batch_arithmetic(tmp_path):
    r = recipe(tmp_path, num_processes=8, global_batch_samples=2048)
    stage = r.stage("grpo")
    assert stage.batch_arithmetic(8) == "16 per device x 16 accumulation x 8 process(es) = 2048 samples = 256 queries x 8"
    assert stage.check_recipe(r) is None
    assert stage.referenced_stages(r) == ["rm"]


def test_refuses_batches_that_do_not_divide(tmp_path):
    # `plan` and `run` validate through the recipe: the stage's check_recipe names the key.
    with pytest.raises(RecipeError, match=r"per_device_train_batch_size: 5 per device x 1 accumulation x 3 "
                       r"process\(es\) = 15 samples, which is not a whole number of queries x 8"):
        recipe(tmp_path, num_processes=3, per_device_train_batch_size=5, gradient_accumulation_steps=1)
    with pytest.raises(RecipeError, match="global_batch_samples: .* = 256 samples = 32 queries x 8, not the 2048"):
        recipe(tmp_path, num_processes=1, global_batch_samples=2048)


def test_reward_sources_and_names(tmp_path):
    with pytest.raises(RecipeError, match="not an earlier reward_model stage"):
        recipe(tmp_path, rewards=[{"kind": "reward_model", "source": "grpo"}])
    with pytest.raises(ValidationError, match="unique"):
        Config(name="g", rewards=[{"kind": "verifier"}, {"kind": "verifier"}])
    with pytest.raises(ValidationError, match="takes none"):
        Config(name="g", rewards=[{"kind": "verifier", "source": "rm"}])
    with pytest.raises(ValidationError, match="need order_by_reward_variance"):
        Config(name="g", order_by_reward_variance=False, reorder_each_epoch=True)


def test_ordering_defaults_and_sample_count():
    shuffled = Config(name="g", order_by_reward_variance=False)  # the default reorder_each_epoch does not object
    assert shuffled.reorder_each_epoch and Config(name="g").reorder_source == "rollouts"
    with pytest.raises(ValidationError, match="ordering_samples 4 != num_generations 8"):
        Config(name="g", ordering_samples=4)
    assert Config(name="g", ordering_samples=4, train_on_ordering_samples=False).ordering_samples == 4
    assert Config(name="g").ordering_window == 8
    with pytest.raises(ValidationError, match="set ordering_window: null"):
        Config(name="g", low_variance_policy="drop")
    assert Config(name="g", low_variance_policy="drop", ordering_window=None).low_variance_policy == "drop"
