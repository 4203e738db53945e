"""What the runner hands a stage (`StageContext`) and what a stage hands back (`StageResult`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed
from .errors import UserError
from .recipe import DataConfig, Recipe, StageConfig

if TYPE_CHECKING:  # heavy imports stay out of `qwen-align plan`
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    output: Path  # the stage's main output: a checkpoint (or dataset) directory
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)  # further named outputs a later stage may read


@dataclass
class StageContext:
    recipe: Recipe
    stage_dir: Path  # the stage's own folder inside run_dir
    init_source: str  # checkpoint dir or preset name the stage starts from
    resume_checkpoint: str | None  # trainer checkpoint to resume from, if the stage was interrupted
    metrics_path: Path
    is_main_process: bool = True
    manifest: dict[str, Any] = field(default_factory=dict)  # the run's manifest as the stage starts
    stage_hashes: dict[str, str] = field(default_factory=dict)  # what each earlier stage's config hash is now

    @property
    def output_dir(self) -> Path:
        return self.stage_dir / "final"

    @property
    def checkpoints_dir(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def stage_output(self, name: str, output: str | None = None) -> str:
        """The output folder of an earlier, completed stage of this run (`output` picks a named one)."""
        if not any(s.name == name for s in self.recipe.stages):
            return name  # not a stage: a path, taken as written
        entry = self.manifest.get("stages", {}).get(name)
        if not entry or entry.get("status") != "completed":
            raise UserError(f"stage '{name}' has not completed in {self.recipe.run_dir}; run it first")
        if name in self.stage_hashes and entry.get("config_hash") != self.stage_hashes[name]:
            raise UserError(f"stage '{name}' is out of date in {self.recipe.run_dir} (its options or inputs changed "
                            "since it ran); run it first")
        if output is None:
            return entry["output"]
        outputs = entry.get("outputs") or {}
        if output not in outputs:
            raise UserError(f"stage '{name}' has no output '{output}' (it has: {', '.join(outputs) or 'none'})")
        return outputs[output]

    def resolve_data(self, data: DataConfig) -> DataConfig:
        """A copy of `data` whose sources that name an earlier stage point at that stage's output folder."""
        data = data.model_copy(deep=True)
        for src in data.sources:
            if src.stage:
                base = Path(self.stage_output(src.stage, src.output))
                src.path = str(base / src.path) if src.path else str(base)
        return data

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer travels with checkpoints; a preset start takes the recipe's `tokenizer`."""
        from .tokenizer import load_tokenizer

        init = Path(self.init_source)
        if (init / "tokenizer_config.json").is_file():
            return load_tokenizer(init)
        if self.recipe.tokenizer:
            return load_tokenizer(self.recipe.tokenizer)
        raise UserError(f"{self.recipe.source}: tokenizer: required when the model is a preset ('{self.init_source}')")

    def load_policy(self, stage: StageConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        from .model import load_model

        return load_model(
            self.init_source, "policy", tokenizer=tokenizer, dtype=resolve_stage_dtype(stage.dtype),
            attn_implementation=stage.attn_implementation, seed=self.seed,
        )

    def evaluate_task(self, stage: StageConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
        """Greedy answers to the stage's held-out prompts, verified; {} when the stage names none.

        Every rank calls it: each answers its share of the batches (the model is a full replica) and all get
        the one-process result, so no rank waits alone in a collective while another evaluates.
        """
        if stage.task_eval is None:
            return {}
        from .generation import load_eval_rows, task_accuracy

        rows = load_eval_rows(stage.task_eval.path, stage.task_eval.limit)
        model.config.use_cache = True
        result = task_accuracy(model, tokenizer, rows, stage.task_eval.max_new_tokens, stage.task_eval.batch_size,
                               shard_batches=True)
        families = ", ".join(f"{k} {v:.1%}" for k, v in result["by_family"].items())
        if self.is_main_process:
            print(f"[{stage.name}] held-out accuracy: {result['accuracy']:.1%} on {result['num_examples']} prompts "
                  f"({families})")
        self.log_metrics({"stage": stage.name, "heldout_accuracy": result["accuracy"]})
        return {"heldout_accuracy": result["accuracy"], "heldout": result}

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main_process:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


def resolve_stage_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def trainer_arguments(stage: StageConfig, context: StageContext) -> dict[str, Any]:
    """The transformers TrainingArguments every training stage shares, from the common stage options.

    Each kind passes these to its TRL config class (SFTConfig, DPOConfig, ...) next to its own options.
    """
    import torch

    dtype = resolve_stage_dtype(stage.dtype)
    return dict(
        output_dir=str(context.checkpoints_dir),
        seed=context.seed,
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.num_train_epochs,
        max_steps=stage.max_steps,
        per_device_train_batch_size=stage.per_device_train_batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation_steps,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        lr_scheduler_type=stage.lr_scheduler_type,
        lr_scheduler_kwargs=stage.lr_scheduler_kwargs or None,
        warmup_steps=stage.warmup_steps,
        logging_steps=stage.logging_steps,
        save_steps=stage.save_steps,
        save_total_limit=stage.save_total_limit,
        activation_checkpointing=stage.gradient_checkpointing,  # transformers 5's name; TRL configs default it on
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        report_to="none",
        # Without GPUs, torchrun's processes are CPU ranks (gloo): unless told so, transformers sees no
        # distributed launch and each rank trains alone.
        use_cpu=not torch.cuda.is_available(),
        ddp_timeout=int(distributed.DEFAULT_TIMEOUT.total_seconds()),
    )


def save_trained_model(trainer, tokenizer: PreTrainedTokenizerBase, context: StageContext) -> PreTrainedModel:
    """The trained model (unwrapped, LoRA merged) written as the stage's output checkpoint by the main process."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        from .model import save_checkpoint

        save_checkpoint(model, tokenizer, context.output_dir)
    trainer.accelerator.wait_for_everyone()
    return model


def train_metrics(train_output) -> dict[str, Any]:
    """What every training stage records of `trainer.train()`, plus peak GPU memory when there is a GPU."""
    import torch

    metrics = {
        "train_loss": train_output.training_loss,
        "train_steps": train_output.global_step,
        "train_runtime_s": round(train_output.metrics.get("train_runtime", 0.0), 2),
    }
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return metrics
