"""Reward-model stage options. The Qwen2.5 report gives no reward-model hyperparameters; the defaults are
common Bradley-Terry settings (TRL's RewardTrainer), each overridable."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from qwen_align.recipe import DataConfig, StageConfig


class Config(StageConfig):
    kind: Literal["reward_model"] = "reward_model"
    data: DataConfig = Field(
        description="Preference pairs (prompt/chosen/rejected, TRL's format; an optional numeric `margin` "
        "column enters the Bradley-Terry loss); required. A source may be `{stage: rejection_sampling}`."
    )
    score: Literal["scalar", "likelihood"] = Field(
        "scalar", description="`scalar`: a Qwen2ForSequenceClassification, the score is its logit at the last token. "
        "`likelihood`: the model stays a causal LM and scores beta x the mean log-probability of the response "
        "tokens (SimPO's reward), trained with the same Bradley-Terry loss; a small model verifies far better this "
        "way (docs/demo.md). GRPO's reward, rejection-sampling review and `qwen-align eval-rm` read both."
    )
    beta: float = Field(2.0, gt=0, description="`score: likelihood`: the scale of the mean log-probability (SimPO uses 2-2.5).")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the pairs.")
    max_length: int = Field(8192, gt=0, description="Tokens per formatted conversation (prompt + response).")
    on_long: Literal["truncate", "drop"] = Field(
        "truncate", description="Pairs over max_length: cut from the left (keeps the response end, where the "
        "reward is read), or drop the pair."
    )
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Adds coef * mean((r_chosen + r_rejected)^2) to keep rewards centred at 0 "
        "(TRL; 0.01 is the value it suggests)."
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Seeded share of the pairs held out for accuracy and mean margin."
    )
    eval_data: DataConfig | None = Field(
        None, description="Separate held-out pairs for accuracy and mean margin; they replace the eval_fraction "
        "share unless eval_fraction is also set."
    )
    eval_batch_size: int = Field(16, gt=0, description="Conversations per forward pass when scoring held-out pairs.")

    @model_validator(mode="after")
    def _likelihood_needs_a_whole_model(self):
        if self.score == "likelihood" and self.lora is not None and self.lora.save == "adapter":
            raise ValueError("score: likelihood writes a whole causal LM marked as a reward model; use lora.save: merged")
        return self

    def key_hyperparameters(self) -> dict[str, Any]:
        return {
            **super().key_hyperparameters(),
            "score": self.score,
            **({"beta": self.beta} if self.score == "likelihood" else {}),
            "max_length": self.max_length,
            "center_rewards_coefficient": self.center_rewards_coefficient,
            "eval_fraction": self.eval_fraction,
        }
