"""Run the GRPO stage: query set -> reward-variance ordering -> TRL GRPOTrainer -> a checkpoint."""

from __future__ import annotations

import logging
import math

from datasets import Dataset
from transformers import set_seed
from trl import GRPOConfig

from qwen_align import distributed, lora
from qwen_align.callbacks import training_callbacks
from qwen_align.checkpoints.published import is_checkpoint, save_checkpoint
from qwen_align.errors import UserError
from qwen_align.model import load_reward_scorer
from qwen_align.stage import (
    StageContext, StageResult, resolve_stage_dtype, save_trained_model, train_metrics, trainer_arguments,
)

from .config import Config
from .ordering import OrderingSchedule
from .queries import load_queries, reward_model_stage
from .rewards import RewardModelReward, VerifierReward
from .trainer import OrderedGRPOTrainer, QueryScorer, RolloutCache, SkipStepsWithoutGradient, load_ordering_state
from .vllm import check_vllm_backend, vllm_arguments

log = logging.getLogger(__name__)

ORDERING_FILE = "ordering.json"


def training_args(stage: Config, context: StageContext) -> GRPOConfig:
    return GRPOConfig(
        **trainer_arguments(stage, context),
        steps_per_generation=stage.steps_per_generation,
        num_generations=stage.num_generations,
        num_iterations=stage.num_iterations,
        loss_type=stage.loss_type,
        beta=stage.beta,
        epsilon=stage.epsilon,
        epsilon_high=stage.epsilon_high,
        delta=stage.delta,
        scale_rewards=stage.scale_rewards,
        temperature=stage.temperature,
        top_p=stage.top_p,
        max_completion_length=stage.max_completion_length,
        reward_weights=[r.weight for r in stage.rewards],
        shuffle_dataset=not stage.order_by_reward_variance,
        **vllm_arguments(stage),
    )


def build_rewards(stage: Config, context: StageContext, tokenizer, device) -> list:
    funcs = []
    for spec in stage.rewards:
        if spec.kind == "verifier":
            funcs.append(VerifierReward(spec.label))
            continue
        source = spec.source or reward_model_stage(stage, context.recipe).name
        path = context.stage_output(source)
        model = load_reward_scorer(path, tokenizer=tokenizer, dtype=resolve_stage_dtype(stage.dtype),
                                   attn_implementation=stage.attn_implementation)
        funcs.append(RewardModelReward(model.to(device), tokenizer, name=spec.label))
    return funcs


def steps_per_chunk(args: GRPOConfig) -> float:
    """Optimizer steps per generation batch (the unit the sampler draws)."""
    return args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps


def reorder_every_chunks(stage: Config, args: GRPOConfig) -> int | None:
    """`reorder_every_steps` (optimizer steps) in generation batches."""
    if not stage.reorder_every_steps:
        return None
    return max(1, round(stage.reorder_every_steps / steps_per_chunk(args)))


def chunk_budget(args: GRPOConfig) -> int | None:
    """Generation batches a `max_steps` run consumes; None for an epochs run (it consumes whole passes)."""
    return math.ceil(args.max_steps / steps_per_chunk(args)) if args.max_steps > 0 else None


def make_trainer(stage: Config, context: StageContext, model, tokenizer, queries, reward_funcs, callbacks=()):
    """The trainer, and (ordered stages) its ordering schedule, bound to the trainer's policy."""
    args = training_args(stage, context)
    dataset = Dataset.from_list(queries)
    schedule = scorer = cache = None
    if stage.order_by_reward_variance:
        cache = RolloutCache() if stage.train_on_ordering_samples else None
        scorer = QueryScorer(
            queries, tokenizer, reward_funcs, [r.weight for r in stage.rewards],
            num_samples=stage.ordering_samples or stage.num_generations, batch_size=stage.ordering_batch_size,
            seed=context.seed, cache=cache,
        )

        def on_round(summary):
            sampled = summary["source"] != "rollouts"
            stats = {f"ordering/{k}": v for k, v in scorer.last_reward_stats.items()} if sampled else {}
            context.log_metrics({"stage": stage.name, **{f"ordering_{k}": v for k, v in summary.items()}, **stats})
            if summary["reason"] == "window":
                return  # one per window of the first pass: metrics.jsonl and ordering.json, not the console
            print(f"[{stage.name}] ordering round {summary['round']} ({summary['reason']}, from "
                  f"{summary['source']}): {summary['scored']} queries ranked, {summary['low_variance']} with reward "
                  f"variance <= {stage.variance_epsilon:g}, {summary['seconds']:.1f} s")

        schedule = OrderingSchedule(
            len(queries), args.generation_batch_size // stage.num_generations, scorer,
            epsilon=stage.variance_epsilon, policy=stage.low_variance_policy,
            reorder_every_chunks=reorder_every_chunks(stage, args), reorder_each_epoch=stage.reorder_each_epoch,
            artifact=context.stage_dir / ORDERING_FILE if context.is_main_process else None, on_round=on_round,
            source=stage.reorder_source, needs_samples=(lambda q: not cache.has(q)) if cache is not None else None,
            window=stage.ordering_window, chunk_budget=chunk_budget(args),
        )
    skipper = SkipStepsWithoutGradient() if stage.skip_steps_without_gradient else None
    trainer = OrderedGRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[*callbacks, *([skipper] if skipper else [])], schedule=schedule, rollout_cache=cache,
        peft_config=lora.peft_config(stage.lora, "causal_lm"),
    )
    trainer.step_skipper = skipper
    if scorer is not None:
        scorer.bind(trainer)
        schedule.clock = lambda: trainer.state.global_step
    return trainer, schedule


def start_schedule(schedule: OrderingSchedule, context: StageContext, name: str,
                   cache: RolloutCache | None = None) -> None:
    """A fresh run ranks the queries now; a resumed one takes the schedule (and rollout cache) saved in its
    checkpoint."""
    state = load_ordering_state(context.resume_checkpoint) if context.resume_checkpoint else None
    if state is not None:
        schedule.load_state_dict(state)
        if cache is not None and "rollout_cache" in state:
            cache.load_state_dict(state["rollout_cache"])
        print(f"[{name}] ordering restored from {context.resume_checkpoint} (epoch {schedule.epoch}, "
              f"{schedule.chunks_done} generation batches consumed, {len(schedule.rounds)} round(s))")
        return
    if context.resume_checkpoint:
        log.warning("%s holds no ordering state; ranking the queries again with the resumed weights",
                    context.resume_checkpoint)
    schedule.initial_round()
    if cache is not None:
        cache.keep_only(schedule.active)  # `drop` left some queries out: their samples are never trained on


def ordering_metrics(schedule: OrderingSchedule, trainer: OrderedGRPOTrainer, runtime: float,
                     artifact: str) -> dict:
    """What ordering cost: the sampling rounds' seconds; of those, the overhead -- what training would not have
    spent without ordering: the log-prob pass over samples it trains on, and all of the samples it never trains
    on -- against the training time; and the samples no step trained on."""
    scorer, cache = schedule.scorer, trainer.rollout_cache
    drawn = cache.generated if cache is not None else scorer.samples_drawn  # the cache's counts survive resume
    trained = cache.trained if cache is not None else 0
    unused = (drawn - trained) / drawn if drawn else 0.0
    logps = getattr(scorer, "logps_seconds", 0.0)
    overhead = logps * (1 - unused) + schedule.seconds * unused
    initial = schedule.rounds[0]["seconds"] if schedule.rounds and schedule.rounds[0]["reason"] == "initial" else 0.0
    total = runtime + initial  # rounds inside trainer.train() are part of train_runtime; the first is not
    return {
        "ordering_rounds": len(schedule.rounds),
        "ordering_rounds_sampled": sum(r.get("source") != "rollouts" for r in schedule.rounds),
        "ordering_seconds": round(schedule.seconds, 2),
        "ordering_overhead_seconds": round(overhead, 2),
        "ordering_overhead_pct": round(100 * overhead / max(total, 1e-9), 1),
        "ordering_samples_drawn": drawn,
        "ordering_samples_trained_on": trained,
        "rollouts_for_ordering_only": drawn - trained,
        "ordering_artifact": artifact,
        "queries_dropped": schedule.num_queries - len(schedule.active),
    }


def check_enough_queries(stage: Config, num_queries: int) -> None:
    """A query set smaller than one generation batch gives the trainer no step at all; say so before any work."""
    per_batch = stage.generation_batch(distributed.world_size()) // stage.num_generations
    if num_queries < per_batch:
        raise UserError(
            f"stage '{stage.name}': {num_queries} queries, but one generation batch takes {per_batch} (per device "
            f"{stage.per_device_train_batch_size} x {distributed.world_size()} process(es) x steps_per_generation "
            f"{stage.steps_per_generation or stage.gradient_accumulation_steps} / num_generations "
            f"{stage.num_generations}); give more queries or lower gradient_accumulation_steps"
        )


def keep_start_as_reference(model, tokenizer, context: StageContext) -> None:
    """TRL rebuilds the KL reference (beta > 0) from the policy's checkpoint path; a preset start has none, so
    the start is written once to `<stage>/reference` and the policy's config points there."""
    folder = context.stage_dir / "reference"
    with distributed.main_writes() as writer:
        if writer and (context.resume_checkpoint is None or not is_checkpoint(folder)):
            save_checkpoint(model, tokenizer, folder)
    model.config._name_or_path = str(folder)


def run(stage: Config, context: StageContext) -> StageResult:
    lora.check_runnable(stage.lora, stage.name)
    set_seed(context.seed)
    tokenizer = context.tokenizer()
    queries, data_report = load_queries(stage, context)
    print(f"[{stage.name}] {data_report['queries']} queries ({data_report['queries_with_verifier']} with a "
          f"verifier) from {data_report['query_source']}")
    check_enough_queries(stage, len(queries))
    model = context.load_policy(stage, tokenizer)
    if stage.beta > 0 and stage.lora is None and not is_checkpoint(context.init_source):
        keep_start_as_reference(model, tokenizer, context)
    metrics: dict = {"data": data_report}
    if stage.task_eval is not None:  # every rank answers its share
        print(f"[{stage.name}] before GRPO:")
        before = context.evaluate_task(stage, model, tokenizer)
        metrics["heldout_accuracy_before"] = before.get("heldout_accuracy")
    reward_funcs = build_rewards(stage, context, tokenizer, distributed.device())
    check_vllm_backend(stage)  # before the trainer starts TRL's engine, with the GPU's free memory handed back
    trainer, schedule = make_trainer(stage, context, model, tokenizer, queries, reward_funcs,
                                     callbacks=training_callbacks(stage, context))
    if schedule is not None:
        start_schedule(schedule, context, stage.name, trainer.rollout_cache)
    train_output = trainer.train(resume_from_checkpoint=context.resume_checkpoint)
    model = save_trained_model(trainer, tokenizer, context, stage)

    runtime = train_output.metrics.get("train_runtime", 0.0)
    metrics.update({
        **train_metrics(train_output),
        "samples_consumed": train_output.global_step * trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps * trainer.accelerator.num_processes,
    })
    if trainer.step_skipper is not None:
        metrics["steps_without_gradient"] = trainer.step_skipper.skipped
    if schedule is not None:
        metrics.update(ordering_metrics(schedule, trainer, runtime, str(context.stage_dir / ORDERING_FILE)))
        print(f"[{stage.name}] ordering: {metrics['ordering_rounds']} round(s) ({metrics['ordering_rounds_sampled']} "
              f"sampled, {schedule.seconds:.1f} s); overhead {metrics['ordering_overhead_seconds']:.1f} s = "
              f"{metrics['ordering_overhead_pct']:.1f}% of the stage's training; {metrics['ordering_samples_drawn']} "
              f"samples drawn, {metrics['rollouts_for_ordering_only']} not trained on")
    if stage.task_eval is not None:
        print(f"[{stage.name}] after GRPO:")
        metrics.update(context.evaluate_task(stage, model, tokenizer))
    return StageResult(output=context.output_dir, metrics=metrics)


__all__ = ["run", "make_trainer", "build_rewards", "training_args", "ORDERING_FILE"]
