"""Reward-model stage options. The Qwen2.5 report gives no reward-model hyperparameters; the defaults are
common Bradley-Terry settings (TRL's RewardTrainer), each overridable."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from qwen_align.recipe import DataConfig, StageConfig


class Config(StageConfig):
    kind: Literal["reward_model"] = "reward_model"
    data: DataConfig = Field(
        description="Preference pairs (prompt/chosen/rejected, TRL's format; an optional numeric `margin` "
        "column enters the Bradley-Terry loss); required. A source may be `{stage: rejection_sampling}`."
    )
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

    def key_hyperparameters(self) -> dict[str, Any]:
        return {
            **super().key_hyperparameters(),
            "max_length": self.max_length,
            "center_rewards_coefficient": self.center_rewards_coefficient,
            "eval_fraction": self.eval_fraction,
        }
