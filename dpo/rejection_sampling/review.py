"""The reward-model half of the rejection-sampling review: score whole conversations with a 1-label RM."""

from __future__ import annotations

from typing import Any

import torch

from qwen_align import distributed
from qwen_align.model import load_model


class RewardScorer:
    """Scores `prompt + [assistant reply]` conversations with a reward model checkpoint."""

    def __init__(self, path: str, tokenizer, *, dtype: str = "float32", batch_size: int = 16, max_length: int = 8192):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.model = load_model(path, "reward", tokenizer=tokenizer, dtype=dtype)
        self.model.eval()
        self.model.to(distributed.device())  # this rank's own GPU, or the CPU

    @torch.no_grad()
    def score(self, items: list[tuple[list[dict[str, Any]], str]]) -> list[float]:
        """RM score of each (prompt messages, response text)."""
        texts = [
            self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
            for prompt, reply in items
        ]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        scores: list[float] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                    truncation=True, max_length=self.max_length, add_special_tokens=False,
                ).to(self.model.device)
                logits = self.model(**enc).logits
                scores.extend(logits[:, 0].float().tolist())
        finally:
            self.tokenizer.padding_side = side
        return scores
