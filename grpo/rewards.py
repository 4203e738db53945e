"""Rewards for GRPO, as TRL reward functions: a trained reward model and the rows' verifiers.

Both are plain callables `f(prompts, completions, **columns) -> list[float | None]` with a `__name__`, so
TRL logs each under `rewards/<name>/mean` and `/std`, and the ordering pass scores with the very same code.
A verifier returns None (TRL: NaN, left out of the weighted sum) for rows that name no verifier.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from qwen_align import verifiers
from qwen_align.rm_eval.scorer import score_conversations

VERIFIER_COLUMN = "verifier_row"  # the row's verifier fields as JSON (one column: the rows' schemas differ)


def _text(completion: Any) -> str:
    """A completion as text: TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


def _messages(prompt: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class RewardModelReward:
    """A trained reward model (scalar head or likelihood RM) scoring the chat-formatted prompt + response."""

    def __init__(self, model, tokenizer, name: str = "reward_model", batch_size: int = 32, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.__name__ = name
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        conversations = [(_messages(p), _text(c)) for p, c in zip(prompts, completions, strict=True)]
        # Batched in the callers' order, as the trainer and the ordering pass both hand them over.
        return score_conversations(self.model, self.tokenizer, conversations, self.max_length or 10**9,
                                   self.batch_size, sort_by_length=False)


class VerifierReward:
    """1.0 / 0.0 from the row's verifier (`exact`, `regex`, `math`, `code`, `ifeval`); None without one."""

    def __init__(self, name: str = "verifier"):
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        rows = [json.loads(r) if r else {} for r in columns.get(VERIFIER_COLUMN) or [None] * len(prompts)]
        texts = [_text(c) for c in completions]
        out: list[float | None] = [None] * len(texts)
        todo = [i for i, row in enumerate(rows) if row.get("verifier")]
        if hasattr(verifiers, "verify_batch"):
            results = verifiers.verify_batch([rows[i] for i in todo], [texts[i] for i in todo])
        else:
            results = [verifiers.verify(rows[i], texts[i]) for i in todo]
        for i, result in zip(todo, results):
            out[i] = float(result.score)
        return out


def combined(per_func: list[list[float | None]], weights: list[float]) -> list[float]:
    """TRL's sum: weighted, NaN-skipping; NaN where no reward applied to a sample."""
    out = []
    for values in zip(*per_func):
        present = [(w * v) for v, w in zip(values, weights) if v is not None and not math.isnan(v)]
        out.append(sum(present) if present else math.nan)
    return out
