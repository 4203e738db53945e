"""Run the DPO stage: preference pairs -> TRL DPOTrainer with an online merging optimizer -> a checkpoint.

Reference model: the stage's start (`init_from`, the SFT output); with `lora`, the policy with its adapter off.
Base for the SFT delta τ_r: `base_model`, else the recipe's `model` — for a preset that is the same seeded
random init the SFT stage started from.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

from datasets import Dataset
from transformers import set_seed
from trl import DPOConfig

from qwen_align import lora
from qwen_align.callbacks import training_callbacks
from qwen_align.data import load_training_rows
from qwen_align.errors import UserError
from qwen_align.stage import (
    StageContext, StageResult, load_dtype, save_trained_model, train_metrics, trainer_arguments,
)

from .config import Config
from .trainer import OnlineMergingDPOTrainer, pair_metrics

log = logging.getLogger(__name__)

PAIR_KEYS = ("prompt", "chosen", "rejected")


def training_args(stage: Config, context: StageContext) -> DPOConfig:
    loss_types, loss_weights = stage.losses()
    return DPOConfig(
        **trainer_arguments(stage, context),
        per_device_eval_batch_size=stage.eval_batch_size,
        max_length=stage.max_length,
        beta=stage.beta,
        loss_type=loss_types,
        loss_weights=loss_weights,
        precompute_ref_log_probs=stage.precompute_ref_log_probs,
    )


def load_pairs(stage: Config, seed: int) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Training pairs, held-out pairs (eval_data, or a seeded eval_fraction of data) and a data report."""
    rows, report = load_training_rows(stage.data, seed, kind="preference")
    rows = [{k: r[k] for k in PAIR_KEYS if k in r} for r in rows]
    eval_rows: list[dict] = []
    if stage.eval_data is not None:
        eval_rows, eval_report = load_training_rows(stage.eval_data, seed, kind="preference")
        eval_rows = [{k: r[k] for k in PAIR_KEYS if k in r} for r in eval_rows]
        report["eval_data"] = eval_report
    elif stage.eval_fraction > 0:
        order = list(range(len(rows)))
        random.Random(seed + 2).shuffle(order)
        n_eval = max(1, math.ceil(stage.eval_fraction * len(rows)))
        if n_eval >= len(rows):
            raise UserError(f"stage '{stage.name}': eval_fraction {stage.eval_fraction} leaves no training pairs "
                            f"out of {len(rows)}")
        held = set(order[:n_eval])
        eval_rows = [rows[i] for i in sorted(held)]
        rows = [r for i, r in enumerate(rows) if i not in held]
    report.update(train_pairs=len(rows), eval_pairs=len(eval_rows))
    return rows, eval_rows, report


def run(stage: Config, context: StageContext) -> StageResult:
    lora.check_runnable(stage.lora, stage.name)
    set_seed(context.seed)
    tokenizer = context.tokenizer()
    train_rows, eval_rows, data_report = load_pairs(stage, context.seed)
    print(f"[{stage.name}] {len(train_rows)} training pairs, {len(eval_rows)} held-out pairs "
          f"(bad rows skipped {data_report['bad_rows_skipped']})")
    dtype = load_dtype(stage)  # the policy's own (master) dtype: the base for τ_r is read in it
    policy = context.load_policy(stage, tokenizer)

    merging = None
    if stage.optimizer == "online_merging":
        base = stage.base_model or context.recipe.model
        # τ_r = the weights the stage starts from − base, built by the optimizer at its first step: after FSDP2
        # has sharded the policy, from this rank's rows of the base only (on resume the saved state carries it).
        print(f"[{stage.name}] online merging ({stage.variant}, p={stage.reserve_rate:g}, "
              f"α={stage.merge_alpha:g}); SFT delta against base '{base}'")
        merging = {"variant": stage.variant, "base": base,
                   "base_load_kwargs": {"tokenizer": tokenizer, "dtype": dtype, "seed": context.seed},
                   "reserve_rate": stage.reserve_rate, "merge_alpha": stage.merge_alpha,
                   "rescale": stage.merge_rescale, "merge_every": stage.merge_every}

    ref_model = None
    # With LoRA the reference is the policy with its adapter switched off (TRL, when ref_model is None).
    if not stage.precompute_ref_log_probs and stage.lora is None:
        ref_model = context.load_model(stage, tokenizer, "policy")
    trainer = OnlineMergingDPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=training_args(stage, context),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora.peft_config(stage.lora, "causal_lm"),
        callbacks=training_callbacks(stage, context),
        merging=merging,
    )

    reference_scores = None
    if eval_rows:  # before training the policy is the reference: its scores are π_ref's
        reference_scores = trainer.sequence_logps(trainer.model, trainer.eval_dataset)
    train_output = trainer.train(resume_from_checkpoint=context.resume_checkpoint)
    model = trainer.model
    metrics: dict[str, Any] = {
        **train_metrics(train_output),
        "optimizer": stage.optimizer_settings(),
        "beta": stage.beta,
        "loss_type": trainer.loss_types,
        "loss_weights": trainer.loss_weights,
        "data": data_report,
    }
    if trainer.merging_optimizer is not None:
        metrics["optimizer"] = {"optimizer": "online_merging", **trainer.merging_optimizer.settings()}
        metrics["sft_delta_norm"] = trainer.merging_optimizer.sft_delta_norm()  # a collective: every rank
        print(f"[{stage.name}] SFT delta τ_r: norm {metrics['sft_delta_norm']:.4g}")
    if reference_scores is not None:
        before = pair_metrics(reference_scores, reference_scores, stage.beta)
        after = pair_metrics(trainer.sequence_logps(model, trainer.eval_dataset), reference_scores, stage.beta)
        metrics["heldout_pairs"] = {"before": before, "after": after}
        metrics["heldout_pair_accuracy"] = after["pair_accuracy"]
        print(f"[{stage.name}] held-out pairs: implicit-reward accuracy {after['pair_accuracy']:.1%} "
              f"(margin {after['reward_margin']:.3g}); policy prefers chosen {before['logp_accuracy']:.1%} -> "
              f"{after['logp_accuracy']:.1%} on {after['pairs']} pairs")
        context.log_metrics({"stage": stage.name, "heldout_pair_accuracy": after["pair_accuracy"],
                             "heldout_logp_accuracy": after["logp_accuracy"]})

    model = save_trained_model(trainer, tokenizer, context, stage)
    metrics.update(context.evaluate_task(stage, model, tokenizer))
    return StageResult(output=context.output_dir, metrics=metrics)
