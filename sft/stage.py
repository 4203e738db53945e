"""Run the SFT stage: mixed conversations -> TRL SFTTrainer -> a checkpoint every stage can load."""

from __future__ import annotations

import logging

from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from qwen_align import lora
from qwen_align.data import load_training_rows
from qwen_align.callbacks import training_callbacks
from qwen_align.checkpoints.resume import atomic_checkpoints
from qwen_align.stage import StageContext, StageResult, save_trained_model, train_metrics, trainer_arguments

from .config import Config
from .dataset import tokenize_conversations
from .packing import check_document_masking, packing_cost_note

log = logging.getLogger(__name__)


def training_args(stage: Config, context: StageContext) -> SFTConfig:
    return SFTConfig(
        **trainer_arguments(stage, context),
        max_length=stage.max_length,
        packing=stage.packing,
        packing_strategy="bfd",
        # The data arrives tokenised with its assistant mask; TRL turns the mask into labels.
        assistant_only_loss=False,
        dataset_num_proc=stage.dataset_num_proc,
    )


def run(stage: Config, context: StageContext) -> StageResult:
    lora.check_runnable(stage.lora, stage.name)
    set_seed(context.seed)
    tokenizer = context.tokenizer()
    rows, data_report = load_training_rows(stage.data, context.seed)
    dataset, lengths = tokenize_conversations(
        rows, tokenizer, stage.max_length, stage.on_long, stage.assistant_only_loss, stage.dataset_num_proc,
        stage.assistant_mask,
    )
    print(
        f"[{stage.name}] {lengths.examples_out} examples, {lengths.tokens} tokens "
        f"(truncated {lengths.truncated}, dropped for length {lengths.dropped_for_length}, "
        f"no target left {lengths.dropped_no_target}, no prefix mask {lengths.dropped_no_prefix}, bad rows skipped {data_report['bad_rows_skipped']})"
    )
    model = context.load_policy(stage, tokenizer)
    before = {}
    if stage.task_eval is not None and context.resume_checkpoint is None:  # the start's accuracy: the chain's baseline
        print(f"[{stage.name}] before SFT:")
        use_cache = model.config.use_cache
        before = context.evaluate_task(stage, model, tokenizer)
        model.config.use_cache = use_cache  # as the model came: training builds no KV cache
    attn = model.config._attn_implementation
    if stage.packing:
        check_document_masking(attn)
        note = packing_cost_note(attn)
        if note:
            log.warning(note)
    if stage.fused_loss:
        from .trainer import FusedLossSFTTrainer as trainer_cls
    else:
        trainer_cls = atomic_checkpoints(SFTTrainer)
    extra = {"loss_chunk_size": stage.loss_chunk_size} if stage.fused_loss else {}
    trainer = trainer_cls(
        model=model,
        args=training_args(stage, context),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora.peft_config(stage.lora, "causal_lm"),
        callbacks=training_callbacks(stage, context),
        **extra,
    )
    train_output = trainer.train(resume_from_checkpoint=context.resume_checkpoint)
    model = save_trained_model(trainer, tokenizer, context, stage)
    metrics = {**train_metrics(train_output), "data": data_report, "lengths": lengths.as_dict()}
    if before:
        metrics["heldout_accuracy_before"] = before["heldout_accuracy"]
    metrics.update(context.evaluate_task(stage, model, tokenizer))
    return StageResult(output=context.output_dir, metrics=metrics)
