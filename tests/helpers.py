"""Small data builders for tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arithmetic_rows(n: int, start: int = 10) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = start + i % 50, 11 + (i * 7) % 40
        rows.append({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                  {"role": "assistant", "content": str(a + b)}]})
    return rows


def arithmetic_pairs(n: int, margin: float | None = None) -> list[dict]:
    """Preference pairs on two-digit sums: chosen the true answer, rejected a near miss (optional `margin`)."""
    rows = []
    for i in range(n):
        a, b = 10 + i % 40, 11 + (i * 7) % 30
        row = {"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
               "chosen": [{"role": "assistant", "content": str(a + b)}],
               "rejected": [{"role": "assistant", "content": str(a + b + 1 + i % 5)}]}
        if margin is not None:
            row["margin"] = margin
        rows.append(row)
    return rows


def tiny_chain_recipe(folder: Path, tokenizer_dir: Path, **top) -> Path:
    """A five-stage chain (sft -> rejection_sampling -> dpo -> reward_model -> grpo) on the tiny preset that
    trains a few steps per stage; rejection sampling's `regex` check (a response holding a digit) passes a share
    of a barely trained model's samples, so it yields pairs. Returns the recipe path."""
    import yaml

    sums = [(10 + i % 50, 11 + (i * 7) % 40) for i in range(64)]
    write_jsonl(folder / "sft.jsonl", arithmetic_rows(64))
    write_jsonl(folder / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {a}+{b}?"}], "verifier": "regex", "pattern": r".*\d.*"}
        for a, b in sums[:24]])
    # Held out: "no words, digits at most" (regex), which a barely trained model's greedy answers pass: the
    # accuracies are then not all zero.
    write_jsonl(folder / "heldout.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {a}+{b}?"}], "verifier": "regex", "pattern": r"\d*"}
        for a, b in sums[40:48]])
    common = {"logging_steps": 1, "save_steps": 50, "dtype": "float32"}
    task_eval = {"path": "heldout.jsonl", "max_new_tokens": 4}
    pairs = {"sources": [{"stage": "rejection_sampling"}]}
    raw = {
        "model": "tiny", "tokenizer": str(tokenizer_dir), "run_dir": str(folder / "run"), "seed": 0, **top,
        "stages": [
            {"name": "sft", "kind": "sft", "data": {"sources": [{"path": "sft.jsonl"}]}, "task_eval": task_eval,
             "max_length": 64, "packing": False, "per_device_train_batch_size": 16, "max_steps": 4,
             "learning_rate": 1e-3, **common},
            {"name": "rejection_sampling", "kind": "rejection_sampling", "init_from": "sft",
             "data": {"sources": [{"path": "prompts.jsonl"}]}, "samples_per_prompt": 4, "max_new_tokens": 4,
             "max_pairs_per_prompt": 2, "chunk_size": 12, "batch_size": 24, "dtype": "float32",
             "review": {"reject_truncated": False}},
            {"name": "dpo", "kind": "dpo", "init_from": "sft", "data": pairs, "eval_fraction": 0.25,
             "task_eval": task_eval, "max_length": 64, "per_device_train_batch_size": 4, "max_steps": 3,
             "learning_rate": 5e-5, "lr_scheduler_type": "constant", "variant": "ondare", "reserve_rate": 0.1,
             "merge_alpha": 1e-3, **common},
            {"name": "reward_model", "kind": "reward_model", "init_from": "dpo", "data": pairs, "eval_fraction": 0.25,
             "max_length": 64, "per_device_train_batch_size": 4, "max_steps": 3, "learning_rate": 3e-4, **common},
            {"name": "grpo", "kind": "grpo", "init_from": "dpo", "task_eval": {**task_eval, "every_steps": 1},
             "rewards": [{"kind": "reward_model", "source": "reward_model", "weight": 0.1}, {"kind": "verifier"}],
             "num_generations": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
             "max_steps": 3, "max_completion_length": 4, "learning_rate": 5e-5, **common},
        ],
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path
