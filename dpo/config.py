"""DPO stage options. Report: ~150K pairs, 1 epoch, LR 7e-7, with the Online Merging Optimizer.

Online merging defaults (p = 0.01, α = 1e-7) are the best DPO settings of Lu et al. 2024 (arXiv:2405.17931);
see docs/online_merging.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from qwen_align.recipe import DataConfig, StageConfig

# TRL 1.16's DPOConfig.loss_type values (tests check this list against the installed TRL).
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


class Config(StageConfig):
    kind: Literal["dpo"] = "dpo"
    data: DataConfig = Field(
        description="Preference pairs (prompt/chosen/rejected, TRL's format); required. "
        "`{sources: [{stage: rejection_sampling}]}` reads that stage's pairs."
    )
    eval_data: DataConfig | None = Field(None, description="Held-out pairs for pair accuracy (instead of eval_fraction).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Seeded share of `data` held out for pair accuracy before/after training "
        "(0: none, unless eval_data is given)."
    )
    eval_batch_size: int = Field(16, gt=0, description="Pairs per batch when scoring held-out pairs.")
    learning_rate: float = Field(7e-7, gt=0, description="Report: 7e-7.")
    num_train_epochs: float = Field(1.0, gt=0, description="Report: 1 epoch.")
    beta: float = Field(0.1, gt=0, description="DPO temperature (TRL's `beta`).")
    loss_type: str | list[str] = Field(
        "sigmoid", description="TRL's DPO loss type, or a list combined with `loss_weights`: "
        + ", ".join(TRL_LOSS_TYPES) + "."
    )
    loss_weights: list[float] | None = Field(None, description="Weights for a list of loss types (TRL's).")
    nll_weight: float = Field(
        0.0, ge=0, description="Adds an NLL loss on the chosen response with this weight (TRL's `sft` loss type; "
        "RPO). Keeps a tiny model from unlearning the task (docs/online_merging.md)."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Score the training pairs with the reference once before training and free it."
    )
    optimizer: Literal["online_merging", "adamw"] = Field(
        "online_merging", description="Report: the Online Merging Optimizer; `adamw` for comparison."
    )
    variant: Literal["ondare", "onties"] = Field(
        "ondare", description="OnDARE (random keep, paper Eq. 3-4) or OnTIES (top-magnitude keep, sign consensus, Eq. 5-7)."
    )
    reserve_rate: float = Field(
        0.01, gt=0, le=1, description="p: share of update/SFT-delta entries kept each step. Paper: best DPO runs "
        "p ≈ 0.01, robust down to 5e-4."
    )
    merge_alpha: float = Field(
        1e-7, ge=0, le=1, description="α: weight of the SFT delta in each merged update. Paper: 1e-7 to 5e-6 "
        "work, 1e-4 collapses; best DPO runs α ≈ 1e-7."
    )
    merge_rescale: bool = Field(
        False, description="OnDARE: divide kept entries by p (DARE's rescaling; the paper finds it unstable)."
    )
    merge_every: int = Field(
        1, gt=0, description="K: merge every K-th step over the K accumulated Adam updates (paper's step-K variant)."
    )
    base_model: str | None = Field(
        None, description="Base checkpoint for the SFT delta τ_r = SFT − base; default: the recipe's model "
        "(a preset rebuilds the same seeded init the SFT stage started from)."
    )
    max_length: int = Field(32_768, gt=0, description="Longest prompt+response in tokens; longer ones are truncated.")

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("give at least one loss type")
        for name in names:
            if name not in TRL_LOSS_TYPES:
                raise ValueError(f"unknown DPO loss type '{name}'; TRL offers: {', '.join(TRL_LOSS_TYPES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        n = 1 if isinstance(self.loss_type, str) else len(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != n:
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {n} loss type(s)")
        if self.optimizer == "online_merging" and self.lora is not None:
            raise ValueError(
                "lora: online merging needs the SFT delta of every trained weight, and LoRA adapters have none; "
                "use `optimizer: adamw` with LoRA, or drop `lora`"
            )
        return self

    def losses(self) -> tuple[list[str], list[float]]:
        """TRL's loss_type and loss_weights, with the NLL term appended when nll_weight > 0."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        weights = list(self.loss_weights) if self.loss_weights else [1.0] * len(types)
        if self.nll_weight > 0:
            types.append("sft")
            weights.append(self.nll_weight)
        return types, weights

    def optimizer_settings(self) -> dict[str, Any]:
        if self.optimizer == "adamw":
            return {"optimizer": "adamw"}
        return {"optimizer": "online_merging", "variant": self.variant, "reserve_rate": self.reserve_rate,
                "merge_alpha": self.merge_alpha, "merge_rescale": self.merge_rescale, "merge_every": self.merge_every}

    def resolve_paths(self, fix, stage_names: set[str]) -> None:
        from qwen_align.presets import preset_name

        if self.base_model is not None and preset_name(self.base_model) is None:
            self.base_model = fix(self.base_model)

    def key_hyperparameters(self) -> dict[str, Any]:
        return {**super().key_hyperparameters(), "beta": self.beta, "loss_type": self.loss_type,
                "nll_weight": self.nll_weight, **self.optimizer_settings()}
