"""Real shapes on CPU: the real Qwen2.5 tokenizer (rebuilt from dashscope's qwen.tiktoken) and the full
151,936-row embedding in a published-layout checkpoint with two small layers, through the stages."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_jsonl
from published import tiny_qwen_config, write_published_checkpoint
from transformers import AutoModelForSequenceClassification

from qwen_align import cli
from qwen_align.checkpoints.published import load_tokenizer
from qwen_align.model import load_model
from sft.dataset import tokenize_conversations

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("dashscope") is None,
                                reason="qwen.tiktoken comes with dashscope")

VOCAB_ROWS = 151_936
HEAD_STD = 0.05  # not transformers' default 0.02, so the test sees that the head follows the config

CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
]


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from qwen_align.tokenizer import build_qwen25_tokenizer

    return build_qwen25_tokenizer()


@pytest.fixture(scope="module")
def full_vocab_dir(tmp_path_factory, qwen_tokenizer):
    config = tiny_qwen_config(vocab_size=VOCAB_ROWS, hidden_size=64, layers=2, initializer_range=HEAD_STD)
    return write_published_checkpoint(tmp_path_factory.mktemp("real") / "qwen2.5-tiny-instruct", qwen_tokenizer,
                                      config=config, shard_bytes=8_000_000)


def _rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {a}+{a + 3}?"},
                          {"role": "assistant", "content": f"{a} + {a + 3} = {2 * a + 3}."}]} for a in range(n)]


def test_sft_labels_are_exactly_the_assistant_tokens(full_vocab_dir, tmp_path):
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(full_vocab_dir)
    # Hand-tokenised: the template's text around the replies, and each reply with its <|im_end|>.
    segments = [
        ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
         "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello! How can I help?<|im_end|>", True),
        ("\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("2 + 2 = 4.<|im_end|>", True),
        ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, learned in segments:
        ids = tok.encode(text, add_special_tokens=False)
        expected_ids += ids
        expected_labels += ids if learned else [-100] * len(ids)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645 and expected_ids[-2] == 151645

    ds, report = tokenize_conversations([{"messages": CONVERSATION}], tok, max_length=256)
    model = load_model(full_vocab_dir, "policy")
    args = SFTConfig(output_dir=str(tmp_path / "t"), max_length=256, packing=False, report_to="none",
                     assistant_only_loss=False, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    row = trainer.train_dataset[0]
    assert row["input_ids"] == expected_ids
    assert row["labels"] == expected_labels


def test_reward_head_starts_as_transformers_initialises_it(full_vocab_dir):
    torch.manual_seed(0)
    rm = load_model(full_vocab_dir, "reward")
    head = rm.score.weight.detach()
    assert head.shape == (1, 64)
    assert 0.6 * HEAD_STD < head.std().item() < 1.4 * HEAD_STD and abs(head.mean().item()) < 0.5 * HEAD_STD
    torch.manual_seed(0)  # the same draw transformers makes for a missing weight under the same seed
    reference = AutoModelForSequenceClassification.from_pretrained(full_vocab_dir, num_labels=1, dtype=torch.float32)
    reference = reference.score.weight
    torch.testing.assert_close(head, reference.detach())


def _chain_recipe(tmp_path: Path, model: Path, kinds: list[str]) -> Path:
    sft_data = write_jsonl(tmp_path / "sft.jsonl", _rows(8))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": f"What is {a}+1?"}], "chosen": [{"role": "assistant", "content": str(a + 1)}],
         "rejected": [{"role": "assistant", "content": str(a + 2)}]} for a in range(8)])
    queries = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": f"What is {a}+1?"}],
                                                  "verifier": "exact", "answer": str(a + 1)} for a in range(4)])
    few = {"max_steps": 2, "logging_steps": 1, "save_steps": 100, "dtype": "float32", "learning_rate": 1e-4}
    stages = {
        "sft": {"name": "sft", "kind": "sft", "data": {"sources": [{"path": str(sft_data)}]}, "max_length": 64,
                "packing": False, "per_device_train_batch_size": 4, **few},
        "dpo": {"name": "dpo", "kind": "dpo", "init_from": "sft", "data": {"sources": [{"path": str(pairs)}]},
                "max_length": 48, "per_device_train_batch_size": 2, **few},
        "reward_model": {"name": "rm", "kind": "reward_model", "init_from": "sft",
                         "data": {"sources": [{"path": str(pairs)}]}, "max_length": 48,
                         "per_device_train_batch_size": 4, "eval_fraction": 0.25, **few},
        "grpo": {"name": "grpo", "kind": "grpo", "init_from": "dpo", "data": {"sources": [{"path": str(queries)}]},
                 "rewards": [{"kind": "reward_model"}, {"kind": "verifier"}], "num_generations": 2,
                 "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_completion_length": 4,
                 **few},
    }
    raw = {"model": str(model), "run_dir": str(tmp_path / "run"), "seed": 0, "stages": [stages[k] for k in kinds]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _check_outputs(manifest: dict, names: list[str], tok) -> None:
    for name in names:
        entry = manifest["stages"][name]
        assert entry["status"] == "completed", name
        out = Path(entry["output"])
        config = json.loads((out / "config.json").read_text())
        assert config["vocab_size"] == VOCAB_ROWS
        saved = load_tokenizer(out)
        assert saved.encode("Hello world!") == [9707, 1879, 0] and len(saved) == len(tok)
        if name != "rm":
            gen = json.loads((out / "generation_config.json").read_text())
            assert gen["eos_token_id"] == [151645, 151643]


def test_sft_and_reward_model_from_a_full_vocabulary_checkpoint(full_vocab_dir, qwen_tokenizer, tmp_path, capsys):
    path = _chain_recipe(tmp_path, full_vocab_dir, ["sft", "reward_model"])
    assert cli.main(["run", str(path)]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["metrics"]["lengths"]["examples_out"] == 8
    _check_outputs(manifest, ["sft", "rm"], qwen_tokenizer)
    assert AutoModelForSequenceClassification.from_pretrained(manifest["stages"]["rm"]["output"]).config.num_labels == 1


@pytest.mark.slow
def test_whole_chain_from_a_full_vocabulary_checkpoint(full_vocab_dir, qwen_tokenizer, tmp_path):
    path = _chain_recipe(tmp_path, full_vocab_dir, ["sft", "dpo", "reward_model", "grpo"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "qwen_align.cli", "run", str(path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    _check_outputs(manifest, ["sft", "dpo", "rm", "grpo"], qwen_tokenizer)
    assert manifest["stages"]["grpo"]["metrics"]["train_steps"] == 2
