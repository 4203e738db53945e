"""Run the reward-model stage: preference pairs -> Bradley-Terry training (TRL RewardTrainer) of a
Qwen2ForSequenceClassification (`score: scalar`) or of a causal LM scored by its response likelihood
(`score: likelihood`), initialised from a policy checkpoint -> held-out accuracy and margin."""

from __future__ import annotations

import logging
from statistics import mean

from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from qwen_align import distributed, lora
from qwen_align.callbacks import training_callbacks
from qwen_align.checkpoints.resume import atomic_checkpoints
from qwen_align.data import load_training_rows
from qwen_align.reward_score import mark_likelihood
from qwen_align.rm_eval.scorer import score_items
from qwen_align.stage import (
    StageContext, StageResult, save_trained_model, train_metrics, trainer_arguments,
)

from .config import Config
from .dataset import as_items, split_heldout, tokenize_pairs
from .likelihood import LikelihoodCollator, LikelihoodRewardTrainer

log = logging.getLogger(__name__)


def training_args(stage: Config, context: StageContext) -> RewardConfig:
    return RewardConfig(
        **trainer_arguments(stage, context),
        max_length=stage.max_length,
        center_rewards_coefficient=stage.center_rewards_coefficient,
    )


def heldout_metrics(model, tokenizer, items, stage: Config) -> dict:
    """Every rank scores its share of the held-out pairs (the model is a full replica); all get every score."""
    truncated = [0]

    def score(mine):
        if not mine:
            return []
        per_item, fmt = score_items(model, tokenizer, mine, stage.max_length, stage.eval_batch_size, progress=False)
        truncated[0] = fmt["truncated_items"]
        return per_item

    scores = distributed.sharded_map(score, items)
    fmt = {"truncated_items": sum(distributed.gather_objects(truncated[0]))}
    right = [s[0] > s[1] for s in scores]
    margins = [s[0] - s[1] for s in scores]
    return {
        "heldout_pair_accuracy": mean(right),
        "heldout_mean_margin": mean(margins),
        "heldout_tie_rate": mean(s[0] == s[1] for s in scores),
        "heldout_pairs": len(items),
        "heldout_truncated": fmt["truncated_items"],
    }


def run(stage: Config, context: StageContext) -> StageResult:
    lora.check_runnable(stage.lora, stage.name)
    set_seed(context.seed)
    tokenizer = context.tokenizer()
    rows, data_report = load_training_rows(stage.data, context.seed, kind="preference")
    # As in the dpo stage: separate eval_data replaces the held-out share unless eval_fraction is set too.
    fraction = stage.eval_fraction
    if stage.eval_data is not None and "eval_fraction" not in stage.model_fields_set:
        fraction = 0.0
    train_items, heldout = split_heldout(as_items(rows, stage.name + ".data"), fraction, context.seed)
    if stage.eval_data is not None:
        extra_rows, _ = load_training_rows(stage.eval_data, context.seed, kind="preference")
        heldout += as_items(extra_rows, stage.name + ".eval_data")
    dataset, lengths = tokenize_pairs(train_items, tokenizer, stage.max_length, stage.on_long)
    print(f"[{stage.name}] {lengths.pairs_out} training pairs, {len(heldout)} held out (truncated "
          f"{lengths.truncated}, dropped for length {lengths.dropped_for_length}, bad rows skipped "
          f"{data_report['bad_rows_skipped']})")

    likelihood = stage.score == "likelihood"
    role = "policy" if likelihood else "reward"  # a likelihood RM stays a causal LM
    model = context.load_model(stage, tokenizer, role)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = training_args(stage, context)
    trainer_class, extra = RewardTrainer, {}
    if likelihood:
        mark_likelihood(model, stage.beta)  # so every checkpoint says how it scores
        trainer_class = LikelihoodRewardTrainer
        collator = LikelihoodCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
        extra = {"beta": stage.beta, "data_collator": collator}
    trainer = atomic_checkpoints(trainer_class)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora.peft_config(stage.lora, "causal_lm" if likelihood else "reward"),
        callbacks=training_callbacks(stage, context), **extra,
    )
    train_output = trainer.train(resume_from_checkpoint=context.resume_checkpoint)
    trainer.model.config.pad_token_id = tokenizer.pad_token_id
    model = save_trained_model(trainer, tokenizer, context, stage)
    metrics = {**train_metrics(train_output), "data": data_report, "lengths": lengths.as_dict()}
    if heldout:
        held = heldout_metrics(model, tokenizer, heldout, stage)
        metrics.update(held)
        print(f"[{stage.name}] held-out pair accuracy: {held['heldout_pair_accuracy']:.1%} on {len(heldout)} pairs "
              f"(mean margin {held['heldout_mean_margin']:+.3f})")
        context.log_metrics({"stage": stage.name, **{k: v for k, v in held.items()}})
    return StageResult(output=context.output_dir, metrics=metrics)
