"""Reward-model stage (Qwen2ForSequenceClassification, Bradley-Terry). Not built yet: its options validate
and plan, running it fails clearly."""

from typing import Literal

from pydantic import Field

from qwen_align.recipe import DataConfig, StageConfig
from qwen_align.stage import StageContext, StageResult, not_built


class Config(StageConfig):
    kind: Literal["reward_model"] = "reward_model"
    data: DataConfig | None = Field(None, description="Preference pairs (chosen/rejected) in TRL's format.")
    learning_rate: float = 1e-5
    num_train_epochs: float = 1.0
    max_length: int = Field(8192, gt=0)


def run(stage: Config, context: StageContext) -> StageResult:
    return not_built(stage)


__all__ = ["Config", "run"]
