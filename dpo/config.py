"""DPO stage options. Report: ~150K pairs, 1 epoch, LR 7e-7, with the Online Merging Optimizer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from qwen_align.recipe import StageConfig


class Config(StageConfig):
    kind: Literal["dpo"] = "dpo"
    learning_rate: float = Field(7e-7, gt=0, description="Report: 7e-7.")
    num_train_epochs: float = Field(1.0, gt=0, description="Report: 1 epoch.")
    beta: float = Field(0.1, gt=0, description="DPO temperature (TRL's `beta`).")
    loss_type: str = Field("sigmoid", description="Any of TRL's DPO loss types.")
    optimizer: Literal["online_merging", "adamw"] = Field(
        "online_merging", description="Report: the Online Merging Optimizer."
    )
    variant: Literal["ondare", "onties"] = "ondare"
    base_model: str | None = Field(None, description="Base checkpoint for the SFT delta; default: the recipe's model.")
    max_length: int = Field(32_768, gt=0)

    def key_hyperparameters(self) -> dict[str, Any]:
        return {**super().key_hyperparameters(), "beta": self.beta, "optimizer": self.optimizer,
                "variant": self.variant}
