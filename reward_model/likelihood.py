"""Training a likelihood reward model (`score: likelihood`) with TRL's RewardTrainer: the same data, loss
(Bradley-Terry, optional margin and centring) and metrics; only the score comes from the causal LM's
response log-probabilities (`qwen_align.reward_score`) instead of a scalar head."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from qwen_align.reward_score import completion_mask, likelihood_scores

START_COLUMNS = ("chosen_start", "rejected_start")


class LikelihoodCollator(DataCollatorForPreference):
    """TRL's preference batch (chosen rows, then rejected rows) plus a mask of each row's response tokens."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        starts = [e["chosen_start"] for e in examples] + [e["rejected_start"] for e in examples]
        lengths = [len(e["chosen_ids"]) for e in examples] + [len(e["rejected_ids"]) for e in examples]
        out["completion_mask"] = completion_mask(starts, lengths, out["input_ids"].shape[1])
        return out


class _ScoresAsLogits:
    """A causal LM shown to RewardTrainer.compute_loss as a one-output reward model."""

    def __init__(self, model, response_mask, beta: float):
        self.model, self.response_mask, self.beta = model, response_mask, beta

    def __call__(self, input_ids, attention_mask, **_: Any):
        scores = likelihood_scores(self.model, input_ids, attention_mask, self.response_mask, self.beta)
        return SimpleNamespace(logits=scores[:, None])


class LikelihoodRewardTrainer(RewardTrainer):
    def __init__(self, *args, beta: float, **kwargs):
        self.likelihood_beta = beta
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:  # keep the start columns through Trainer's column filter
            self._signature_columns = ["chosen_ids", "rejected_ids", *START_COLUMNS, "margin"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        response_mask = inputs.pop("completion_mask")
        return super().compute_loss(_ScoresAsLogits(model, response_mask, self.likelihood_beta), inputs,
                                    return_outputs, num_items_in_batch)
