"""SFT stage options. Defaults are the Qwen2.5 report's: 32,768 tokens, 2 epochs, LR 7e-6 -> 7e-7,
weight decay 0.1, gradient clipping 1.0."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from qwen_align.recipe import DataConfig, StageConfig


class Config(StageConfig):
    kind: Literal["sft"] = "sft"
    data: DataConfig = Field(description="Conversations (`messages`) to learn from; required.")
    learning_rate: float = Field(7e-6, gt=0, description="Report: 7e-6, decaying to 7e-7.")
    num_train_epochs: float = Field(2.0, gt=0, description="Report: 2.")
    weight_decay: float = Field(0.1, ge=0, description="Report: 0.1.")
    max_grad_norm: float = Field(1.0, ge=0, description="Report: 1.0.")
    lr_scheduler_type: str = Field("cosine_with_min_lr", description="Decay to lr_scheduler_kwargs.min_lr.")
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"min_lr": 7e-7}, description="Report: decays to 7e-7."
    )
    max_length: int = Field(32_768, gt=0, description="Report: 32,768 tokens per (packed) sequence.")
    on_long: Literal["truncate", "drop"] = Field(
        "truncate", description="Examples over max_length: keep the first max_length tokens, or drop them."
    )
    packing: bool = Field(True, description="Pack examples into max_length sequences (best-fit, padding-free).")
    assistant_only_loss: bool = Field(True, description="Loss on assistant turns only (incl. <|im_end|>).")
    assistant_mask: Literal["auto", "markers", "prefix"] = Field(
        "auto", description="How the assistant tokens are found: the template's {% generation %} markers, or prefix "
        "renders (what rendering each assistant turn adds; checked per row); `auto`: markers when the template has them."
    )
    fused_loss: bool = Field(
        True, description="Chunked fused linear+cross-entropy: never builds the [tokens, vocab] logits."
    )
    loss_chunk_size: int | None = Field(None, gt=0, description="Tokens per loss chunk; default sized to ~128 MB.")
    dataset_num_proc: int | None = Field(None, gt=0, description="Processes for tokenising large datasets.")

    def key_hyperparameters(self) -> dict[str, Any]:
        return {
            **super().key_hyperparameters(),
            "max_length": self.max_length,
            "packing": self.packing,
            "assistant_only_loss": self.assistant_only_loss,
        }
