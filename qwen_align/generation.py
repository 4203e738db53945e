"""Sampling from a policy through its chat template, and held-out task accuracy (greedy, verified).

One interface for every stage that generates: evaluation now, rejection sampling and GRPO scoring later.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import iter_rows
from .errors import DataError
from .verifiers import verify


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    num_return_sequences: int = 1


def prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The prompt part of a conversation: everything before the last assistant turn."""
    messages = row["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    params: SamplingParams,
    batch_size: int = 32,
    desc: str = "generating",
) -> list[list[str]]:
    """Responses (num_return_sequences per conversation), decoded without special tokens."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    end_ids = [tokenizer.eos_token_id] + [
        i for i in [tokenizer.convert_tokens_to_ids("<|endoftext|>")] if isinstance(i, int) and i != tokenizer.unk_token_id
    ]
    sample = params.temperature > 0
    out: list[list[str]] = []
    try:
        # Sort by length so a batch pads little; restore the order afterwards.
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: dict[int, list[str]] = {}
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            generated = model.generate(
                **enc,
                max_new_tokens=params.max_new_tokens,
                do_sample=sample,
                temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None,
                top_k=None,
                num_return_sequences=params.num_return_sequences,
                eos_token_id=end_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            n = params.num_return_sequences
            for j, i in enumerate(idx):
                results[i] = decoded[j * n : (j + 1) * n]
        out = [results[i] for i in range(len(texts))]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def load_eval_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for row in iter_rows(path):
        if "messages" not in row.data or "verifier" not in row.data:
            raise DataError(f"{row.origin}: a task-eval row needs 'messages' (the prompt) and 'verifier'")
        rows.append(row.data)
        if limit and len(rows) >= limit:
            break
    return rows


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Greedy answers to held-out prompts, checked by each row's verifier."""
    responses = generate(
        model, tokenizer, [prompt_messages(r) for r in rows], SamplingParams(max_new_tokens=max_new_tokens),
        batch_size=batch_size, desc="held-out eval",
    )
    passed = Counter()
    total = Counter()
    for row, (response,) in zip(rows, responses):
        family = row.get("family", row["verifier"])
        total[family] += 1
        passed[family] += verify(row, response).passed
    n = sum(total.values())
    return {
        "accuracy": sum(passed.values()) / n if n else 0.0,
        "num_examples": n,
        "by_family": {f: passed[f] / total[f] for f in sorted(total)},
        "examples": [{"prompt": prompt_messages(r)[-1]["content"], "response": resp[0]} for r, resp in zip(rows[:3], responses[:3])],
    }
