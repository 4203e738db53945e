"""The reward_model stage end to end on hand-made pairs: TRL RewardTrainer from a (tiny) policy start,
a checkpoint AutoModelForSequenceClassification loads, held-out accuracy and margin in the manifest."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import arithmetic_pairs, write_jsonl
from transformers import AutoModelForSequenceClassification

from qwen_align.errors import DataError
from qwen_align.recipe import load_recipe
from qwen_align.runner import run_recipe


def _recipe(tmp_path, demo_tokenizer_dir, data, **options):
    raw = {
        "model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
        "stages": [{"name": "rm", "kind": "reward_model", "data": {"sources": [{"path": str(data)}]},
                    "max_length": 64, "per_device_train_batch_size": 8, "max_steps": 3, "learning_rate": 1e-3,
                    "eval_fraction": 0.25, "logging_steps": 1, "save_steps": 10, "dtype": "float32", **options}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path, raw


def test_reward_model_stage_trains_and_reports_heldout(tmp_path, demo_tokenizer_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(32, margin=0.5))
    path, raw = _recipe(tmp_path, demo_tokenizer_dir, data, center_rewards_coefficient=0.01)
    entry = run_recipe(load_recipe(path))["stages"]["rm"]
    assert entry["status"] == "completed" and entry["metrics"]["train_steps"] == 3
    m = entry["metrics"]
    # Scored by the trained head: 8 pairs, no ties, so the accuracy is a whole number of pairs out of 8.
    assert m["heldout_pairs"] == 8 and m["heldout_tie_rate"] == 0 and m["heldout_mean_margin"] != 0
    assert m["heldout_pair_accuracy"] * 8 == pytest.approx(round(m["heldout_pair_accuracy"] * 8))
    # A pair accuracy is not a task accuracy: it is recorded under its own name only.
    assert "heldout_accuracy" not in m and 0 <= m["heldout_pair_accuracy"] <= 1
    assert isinstance(m["heldout_mean_margin"], float)
    assert m["lengths"]["pairs_out"] == 24
    model = AutoModelForSequenceClassification.from_pretrained(entry["output"])
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert (tmp_path / "run" / "rm" / "final" / "chat_template.jinja").exists() or json.loads(
        (tmp_path / "run" / "rm" / "final" / "tokenizer_config.json").read_text()).get("chat_template")
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(r.get("stage") == "rm" and "loss" in r for r in records)


def test_reward_model_stage_bad_pairs_name_the_row(tmp_path, demo_tokenizer_dir):
    rows = arithmetic_pairs(4)
    del rows[2]["rejected"]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    path, _ = _recipe(tmp_path, demo_tokenizer_dir, data)
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: missing 'rejected'"):
        run_recipe(load_recipe(path))
