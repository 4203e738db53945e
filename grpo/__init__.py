"""Online RL stage (GRPO, queries ordered by reward variance). Not built yet: its options validate and
plan, running it fails clearly. Report: 8 responses per query, global batch 2048 samples."""

from typing import Any, Literal

from pydantic import Field

from qwen_align.recipe import DataConfig, StageConfig
from qwen_align.stage import StageContext, StageResult, not_built


class Config(StageConfig):
    kind: Literal["grpo"] = "grpo"
    data: DataConfig | None = Field(None, description="Query set; default: the reward model stage's prompts.")
    learning_rate: float = 1e-6
    num_generations: int = Field(8, gt=0, description="Report: 8 responses per query.")
    per_device_train_batch_size: int = Field(16, gt=0, description="Completions per device per micro-batch.")
    gradient_accumulation_steps: int = Field(16, gt=0)
    order_by_reward_variance: bool = Field(True, description="Report: highest reward variance first.")
    beta: float = Field(0.0, ge=0, description="KL coefficient.")
    temperature: float = Field(1.0, gt=0)
    max_completion_length: int = Field(2048, gt=0)

    def key_hyperparameters(self) -> dict[str, Any]:
        return {**super().key_hyperparameters(), "num_generations": self.num_generations}


def run(stage: Config, context: StageContext) -> StageResult:
    return not_built(stage)


__all__ = ["Config", "run"]
