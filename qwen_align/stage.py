"""What the runner hands a stage (`StageContext`) and what a stage hands back (`StageResult`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed
from .distributed import allow_fsdp_on_cpu, launch_backend
from .errors import UserError
from .recipe import DataConfig, LoraOptions, Recipe, StageConfig

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
    stage_config: StageConfig | None = None  # the stage being run (its model options: chat template, rope, shards)
    _task_eval_rows: list[dict[str, Any]] | None = field(default=None, init=False, repr=False)

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
        """The tokenizer travels with checkpoints; a preset start takes the recipe's `tokenizer`. Its chat template
        is the one the stage trains with; the one its output carries rides along (checkpoints.published)."""
        from .checkpoints.published import load_tokenizer

        option = self.stage_config.chat_template if self.stage_config is not None else "auto"
        init = Path(self.init_source)
        if (init / "tokenizer_config.json").is_file():
            return load_tokenizer(init, option)
        if self.recipe.tokenizer:
            return load_tokenizer(self.recipe.tokenizer, option)
        raise UserError(f"{self.recipe.source}: tokenizer: required when the model is a preset ('{self.init_source}')")

    def load_model(self, stage: StageConfig, tokenizer: PreTrainedTokenizerBase, role: str = "policy",
                   source: str | None = None) -> PreTrainedModel:
        """The stage's model (policy or reward) from `source` (default: its start), with its model options."""
        from .model import load_model

        return load_model(
            source or self.init_source, role, tokenizer=tokenizer, dtype=load_dtype(stage),
            attn_implementation=stage.attn_implementation, seed=self.seed,
            quantize=stage.lora.quantize if stage.lora else None,
            rope_scaling=stage.rope_scaling.model_dump() if stage.rope_scaling else None,
        )

    def load_policy(self, stage: StageConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        return self.load_model(stage, tokenizer, "policy")
    def check_task_eval(self, stage: StageConfig) -> list[dict[str, Any]]:
        """The stage's task_eval rows, every one checked (file:line); the runner calls this before the stage runs."""
        if stage.task_eval is None:
            return []
        if self._task_eval_rows is None:
            from .generation import load_eval_rows

            self._task_eval_rows = load_eval_rows(stage.task_eval.path, stage.task_eval.limit)
        return self._task_eval_rows

    def evaluate_task(self, stage: StageConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      step: int | None = None) -> dict:
        """Greedy answers to the stage's held-out prompts, verified; {} when the stage names none.

        Every rank calls it: each answers its share of the batches (the model is a full replica) and all get
        the one-process result, so no rank waits alone in a collective while another evaluates.
        """
        if stage.task_eval is None:
            return {}
        from .generation import task_accuracy

        rows = self.check_task_eval(stage)
        model.config.use_cache = True
        result = task_accuracy(model, tokenizer, rows, stage.task_eval.max_new_tokens, stage.task_eval.batch_size,
                               shard_batches=True)
        families = ", ".join(f"{k} {v:.1%}" for k, v in result["by_family"].items())
        when = f" at step {step}" if step is not None else ""
        if self.is_main_process:
            from .console import say

            say(f"[{stage.name}] held-out accuracy{when}: {result['accuracy']:.1%} on {result['num_examples']} "
                f"prompts ({families})")
        at_step = {} if step is None else {"step": step}
        by_family = {f"heldout_accuracy/{k}": v for k, v in result["by_family"].items()}
        self.log_metrics({"stage": stage.name, **at_step, "heldout_accuracy": result["accuracy"], **by_family})
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


def load_dtype(stage: StageConfig) -> str:
    """The dtype a stage's own model is loaded in: the one mixed-precision rule every stage follows.

    A training stage keeps float32 master weights (and so float32 optimizer state); `dtype` is the compute dtype
    that autocast / FSDP2's MixedPrecisionPolicy / DeepSpeed's bf16 runs the matmuls in. Only `pure_bf16` trains
    bf16 weights. A stage that only samples loads its model in the compute dtype.
    """
    if stage.pure_bf16:
        return "bfloat16"
    return "float32" if stage.trains else resolve_stage_dtype(stage.dtype)


def mixed_precision_arguments(stage: StageConfig) -> dict[str, Any]:
    """TrainingArguments for the compute dtype: `bf16`/`fp16` make accelerate autocast over the fp32 weights."""
    import torch

    # Without GPUs, torchrun's processes are CPU ranks (gloo): unless told `use_cpu`, transformers sees no
    # distributed launch (each rank trains alone) and refuses bf16. DeepSpeed is never set up on a `cpu` state.
    use_cpu = not torch.cuda.is_available() and launch_backend().kind != "deepspeed"
    if stage.pure_bf16:  # the weights are bf16 already; a mixed-precision backend would upcast them (FSDP2 does)
        log.warning("stage '%s': pure_bf16 trains bf16 weights and optimizer state with no float32 master copy; "
                    "updates below bf16's spacing (about 0.4%% of a weight) are lost", stage.name)
        return dict(bf16=False, fp16=False, use_cpu=use_cpu)
    dtype = resolve_stage_dtype(stage.dtype)
    return dict(bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=use_cpu)


def trainer_arguments(stage: StageConfig, context: StageContext) -> dict[str, Any]:
    """The transformers TrainingArguments every training stage shares, from the common stage options.

    Each kind passes these to its TRL config class (SFTConfig, DPOConfig, ...) next to its own options.
    """
    import torch

    from . import tracking

    allow_fsdp_on_cpu()  # before the Trainer sets up accelerate
    reporting = tracking.trainer_arguments(context.recipe.integrations(stage), context.recipe.source, stage.name)

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
        # transformers 5's name; TRL configs default it on. FSDP's own checkpointing replaces it (the two clash).
        activation_checkpointing=stage.gradient_checkpointing and not launch_backend().activation_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        **mixed_precision_arguments(stage),
        **reporting,  # report_to, run_name (and trackio's project); tracking.stage_environment sets the folders
        ddp_timeout=int(distributed.DEFAULT_TIMEOUT.total_seconds()),
    )


def save_trained_model(trainer, tokenizer: PreTrainedTokenizerBase, context: StageContext,
                       stage: StageConfig) -> PreTrainedModel:
    """The trained model (unwrapped) written as the stage's output by the main process, merged or as an
    adapter folder as `lora.save` says, in the published layout (sharded like the start checkpoint, with its
    chat template) and in `save_dtype`.

    Every rank takes part in gathering the full state dict (FSDP2 and ZeRO-3 hold shards); the main process writes.
    Returns a whole model on every rank for the sharded held-out evaluation: under a sharded backend, the saved
    checkpoint reloaded.
    """
    from accelerate.utils import is_peft_model

    from .lora import save_trained

    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    sharded = holds_shards(model)
    layout: dict[str, Any] = {"out_dtype": output_dtype(stage, context), "source": context.init_source,
                              "max_shard_size": stage.max_shard_size}
    if sharded and not is_peft_model(model):
        layout["state_dict"] = accelerator.get_state_dict(trainer.model)  # gathered whole on the main process
    model = save_trained(model, tokenizer, context.output_dir, stage.lora, base=context.init_source, seed=context.seed,
                         writes=accelerator.is_main_process, layout=layout)
    accelerator.wait_for_everyone()
    if sharded:  # every rank evaluates a share on a whole replica: the checkpoint just written, reloaded
        from torch.distributed.fsdp import FSDPModule

        # FSDP2 swaps the model's class for an FSDP subclass; reload as the class underneath.
        model_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        model = model_class.from_pretrained(context.output_dir).to(distributed.device())
    return model


def output_dtype(stage: StageConfig, context: StageContext) -> str:
    """`save_dtype`; `auto` is the input checkpoint's dtype (config.json `dtype`/`torch_dtype`; a preset: fp32)."""
    from .checkpoints.published import DTYPE_NAMES, checkpoint_dtype, is_checkpoint

    if stage.save_dtype != "auto":
        return stage.save_dtype
    if is_checkpoint(context.init_source) and checkpoint_dtype(context.init_source) in DTYPE_NAMES:
        return checkpoint_dtype(context.init_source)
    return "float32"


def holds_shards(model) -> bool:
    """True when this rank's copy of `model` is a shard: FSDP2's DTensors, DeepSpeed ZeRO-3's partitions."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


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
