"""Shared fixtures: the shipped demo tokenizer and small recipes written into a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import arithmetic_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "demo_data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_tokenizer_dir() -> Path:
    return DEMO_DATA / "tokenizer"


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_dir):
    from qwen_align.tokenizer import load_tokenizer

    return load_tokenizer(demo_tokenizer_dir)


@pytest.fixture
def small_sft_recipe(tmp_path, demo_tokenizer_dir):
    """Write a 1-stage SFT recipe on 48 rows that trains for 2 steps; returns (path, raw dict)."""
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(48))
    heldout = write_jsonl(
        tmp_path / "heldout.jsonl",
        [{"messages": [{"role": "user", "content": "What is 12+13?"}], "verifier": "exact", "answer": "25"}] * 4,
    )
    raw = {
        "model": "tiny",
        "tokenizer": str(demo_tokenizer_dir),
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "stages": [
            {
                "name": "sft",
                "kind": "sft",
                "data": {"sources": [{"path": str(data)}]},
                "task_eval": {"path": str(heldout), "max_new_tokens": 4},
                "max_length": 64,
                "packing": False,
                "per_device_train_batch_size": 8,
                "max_steps": 2,
                "learning_rate": 1e-3,
                "save_steps": 1,
                "logging_steps": 1,
                "dtype": "float32",
            }
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path, raw
