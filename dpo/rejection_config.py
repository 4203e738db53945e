"""Rejection-sampling stage options: the policy resamples verifiable queries; verified responses become pairs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from qwen_align.recipe import DataConfig, StageConfig


class RejectionSamplingConfig(StageConfig):
    kind: Literal["rejection_sampling"] = "rejection_sampling"
    data: DataConfig = Field(description="Prompts whose rows name a verifier (answer, tests, instructions).")
    samples_per_prompt: int = Field(8, gt=0, description="Responses sampled per prompt from the policy.")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(2048, gt=0)

    def key_hyperparameters(self) -> dict[str, Any]:
        return {"samples_per_prompt": self.samples_per_prompt, "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens}
