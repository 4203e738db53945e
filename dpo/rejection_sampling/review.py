"""The reward-model half of the rejection-sampling review: score whole conversations with a reward model
(scalar head or likelihood RM; `qwen_align.rm_eval.scorer` does the scoring)."""

from __future__ import annotations

from typing import Any

import torch

from qwen_align import distributed
from qwen_align.model import load_reward_scorer
from qwen_align.rm_eval.scorer import score_conversations


class RewardScorer:
    """Scores `prompt + [assistant reply]` conversations with a reward model checkpoint."""

    def __init__(self, path: str, tokenizer, *, dtype: str = "float32", batch_size: int = 16, max_length: int = 8192):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.model = load_reward_scorer(path, tokenizer=tokenizer, dtype=dtype)
        self.model.eval()
        self.model.to(distributed.device())  # this rank's own GPU, or the CPU

    @torch.no_grad()
    def score(self, items: list[tuple[list[dict[str, Any]], str]]) -> list[float]:
        """RM score of each (prompt messages, response text)."""
        return score_conversations(self.model, self.tokenizer, items, self.max_length, self.batch_size)
