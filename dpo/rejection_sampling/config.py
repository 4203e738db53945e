"""Rejection-sampling stage options: the policy resamples verifiable queries; verified responses become pairs."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from qwen_align.recipe import DataConfig, StageConfig, Strict


class ReviewOptions(Strict):
    """Checks a pair must pass before it is kept (the report's review step); what each rejects is counted."""

    reject_truncated: bool = Field(
        True, description="A response cut at max_new_tokens cannot be `chosen`."
    )
    max_chars: int | None = Field(None, gt=0, description="A longer response cannot be `chosen`.")
    reject_patterns: list[str] = Field(
        default_factory=list, description="Regexes (Python `re.search`); a response matching one cannot be `chosen`."
    )
    reward_model: str | None = Field(
        None, description="Reward-model checkpoint; a pair is kept only when its RM margin exceeds `min_margin`."
    )
    min_margin: float = Field(0.0, description="RM score of chosen minus RM score of rejected must exceed this.")
    reward_batch_size: int = Field(16, gt=0, description="Conversations scored at once by the reward model.")


    @field_validator("reject_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"reject_patterns[{i}] {pattern!r} is not a valid regex ({e})") from None
        return patterns


class RejectionSamplingConfig(StageConfig):
    trains: ClassVar[bool] = False
    kind: Literal["rejection_sampling"] = "rejection_sampling"
    data: DataConfig = Field(description="Prompts whose rows name a verifier (answer, tests, instructions).")
    samples_per_prompt: int = Field(8, gt=0, description="Responses sampled per prompt from the policy.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(2048, gt=0, description="Longest response sampled (stops earlier at <|im_end|>).")
    max_pairs_per_prompt: int = Field(
        4, gt=0, description="Cap on pairs per query (distinct passing x failing responses, round-robin)."
    )
    chunk_size: int = Field(
        512, gt=0, description="Queries per chunk: one output shard each; the unit of progress for resuming."
    )
    write_sft_data: bool = Field(
        True, description="Also write passing responses as SFT conversations (output `sft`: rejection-sampling fine-tuning)."
    )
    sft_per_prompt: int = Field(1, gt=0, description="Passing responses per query kept as SFT data.")
    review: ReviewOptions = Field(default_factory=ReviewOptions, description="Checks before a pair is kept.")
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="`auto`: vLLM when installed on a GPU, else transformers `generate`."
    )
    batch_size: int = Field(64, gt=0, description="Prompts per transformers `generate` call.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM: share of GPU memory it may use.")
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM: GPUs one model is split across.")
    verify_workers: int | None = Field(
        None, gt=0, description="Parallel verifier workers (code tests); default: the verifier's own choice."
    )

    def check_recipe(self, recipe) -> tuple[str, str] | None:
        rm = self.review.reward_model
        names = [s.name for s in recipe.stages]
        if rm is None or rm not in names:
            return None  # none, or a checkpoint folder
        earlier = recipe.stages[: names.index(self.name)]
        if not any(s.name == rm and s.kind == "reward_model" for s in earlier):
            return ("review.reward_model", f"{rm!r} is not an earlier reward_model stage; name one, or a checkpoint folder")
        return None

    def resolve_paths(self, fix, stage_names: set[str]) -> None:
        rm = self.review.reward_model
        if rm is not None and rm not in stage_names:
            self.review.reward_model = fix(rm)

    def referenced_stages(self, recipe) -> list[str]:
        rm = self.review.reward_model
        return [rm] if rm is not None and any(s.name == rm for s in recipe.stages) else []

    def key_hyperparameters(self) -> dict[str, Any]:
        return {"samples_per_prompt": self.samples_per_prompt, "temperature": self.temperature,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "max_pairs_per_prompt": self.max_pairs_per_prompt}
