"""Does reward-variance ordering help GRPO? Ordered vs shuffled queries on the demo task, several seeds.

Same policy start, same query set, same number of training samples per arm. Per arm and seed: the training
reward (verifier pass rate of the sampled responses) and the held-out greedy accuracy against samples
consumed, and the samples needed to reach a target held-out accuracy. The ordering pass's own samples are
reported separately (they are extra rollouts the shuffled arm does not make).

    python benchmarks/grpo_ordering.py --policy runs/demo/sft/final [--seeds 0 1 2] [--steps 60]

Rewards: the demo verifier (`exact`) only, so runs need no trained reward model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grpo.queries import load_queries  # noqa: E402
from grpo.rewards import VerifierReward  # noqa: E402
from grpo.stage import make_trainer  # noqa: E402
from qwen_align.generation import load_eval_rows, task_accuracy  # noqa: E402
from qwen_align.model import load_model  # noqa: E402
from qwen_align.recipe import validate_recipe  # noqa: E402
from qwen_align.stage import StageContext  # noqa: E402
from qwen_align.tokenizer import load_tokenizer  # noqa: E402

DEMO = REPO / "recipes" / "demo_data"


class Curve(TrainerCallback):
    """Training reward per step; held-out accuracy every `every` steps."""

    def __init__(self, model_ref, tokenizer, heldout, every, samples_per_step):
        self.model_ref, self.tokenizer, self.heldout, self.every = model_ref, tokenizer, heldout, every
        self.samples_per_step = samples_per_step
        self.reward: list[tuple[int, float]] = []
        self.accuracy: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            self.reward.append((state.global_step * self.samples_per_step, float(logs["reward"])))

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every == 0:
            acc = task_accuracy(self.model_ref(), self.tokenizer, self.heldout, max_new_tokens=8)["accuracy"]
            self.accuracy.append((state.global_step * self.samples_per_step, acc))


def one_run(policy_dir, ordered, seed, args, heldout, tmp):
    set_seed(seed)
    tokenizer = load_tokenizer(policy_dir)
    raw = {"model": str(policy_dir), "run_dir": str(tmp), "seed": seed, "stages": [{
        "name": "grpo", "kind": "grpo", "data": {"sources": [{"path": str(DEMO / "prompts.jsonl")}],
                                                 "max_examples": args.queries},
        "rewards": [{"kind": "verifier"}], "order_by_reward_variance": ordered,
        "reorder_each_epoch": ordered and args.reorder_each_epoch,
        "per_device_train_batch_size": args.queries_per_step * 8, "gradient_accumulation_steps": 1,
        "max_steps": args.steps, "learning_rate": args.lr, "max_completion_length": 6, "logging_steps": 1,
        "save_steps": 10_000, "dtype": "float32", "lr_scheduler_type": "constant"}]}
    recipe = validate_recipe(raw, "benchmark")
    stage = recipe.stage("grpo")
    context = StageContext(recipe, Path(tmp) / f"{'ordered' if ordered else 'shuffled'}-{seed}", str(policy_dir),
                           None, Path(tmp) / "metrics.jsonl")
    queries, _ = load_queries(stage, context)
    model = load_model(policy_dir, "policy", tokenizer=tokenizer)
    start = task_accuracy(model, tokenizer, heldout, max_new_tokens=8)["accuracy"]
    trainer, schedule = make_trainer(stage, context, model, tokenizer, queries, [VerifierReward()])
    curve = Curve(lambda: trainer.model, tokenizer, heldout, args.eval_every, args.queries_per_step * 8)
    trainer.add_callback(curve)
    t0 = time.perf_counter()
    if schedule is not None:
        schedule.initial_round()
    ordering_s = time.perf_counter() - t0
    out = trainer.train()
    return {
        "arm": "ordered" if ordered else "shuffled", "seed": seed, "start_accuracy": start,
        "reward": curve.reward, "accuracy": [(0, start)] + curve.accuracy,
        "train_s": round(out.metrics["train_runtime"], 1), "ordering_s": round(ordering_s, 1),
        "ordering_samples": len(queries) * 8 if schedule is not None else 0,
        "low_variance_queries": schedule.rounds[0]["low_variance"] if schedule is not None else None,
    }


def samples_to(curve, target):
    return next((s for s, v in curve if v >= target), None)


def smooth(points, window=10):
    return [(s, sum(v for _, v in points[max(0, i - window + 1): i + 1]) / len(points[max(0, i - window + 1): i + 1]))
            for i, (s, _) in enumerate(points)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="start checkpoint (the demo's SFT or DPO output)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--queries", type=int, default=256, help="query set size (ordering pass = 8 x this)")
    p.add_argument("--queries-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--reorder-each-epoch", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write all curves as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    heldout = load_eval_rows(str(DEMO / "heldout.jsonl"), args.heldout)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for ordered in (True, False):
                r = one_run(args.policy, ordered, seed, args, heldout, tmp)
                runs.append(r)
                print(f"seed {seed} {r['arm']:8s} acc {r['accuracy'][0][1]:.1%} -> {r['accuracy'][-1][1]:.1%}  "
                      f"final reward(10-step mean) {smooth(r['reward'])[-1][1]:.3f}  train {r['train_s']} s  "
                      f"ordering {r['ordering_s']} s", flush=True)
    # Targets: per seed, the midpoint between the start accuracy and the best either arm reached; for the
    # training reward, 90% of the best smoothed reward either arm reached.
    print("\nseed  arm       samples to target acc   samples to target reward")
    ratios_acc, ratios_rew = [], []
    for seed in args.seeds:
        pair = {r["arm"]: r for r in runs if r["seed"] == seed}
        best = max(v for r in pair.values() for _, v in r["accuracy"])
        target_acc = pair["ordered"]["start_accuracy"] + 0.5 * (best - pair["ordered"]["start_accuracy"])
        best_rew = max(v for r in pair.values() for _, v in smooth(r["reward"]))
        target_rew = 0.9 * best_rew
        got = {}
        for arm, r in pair.items():
            got[arm] = (samples_to(r["accuracy"], target_acc), samples_to(smooth(r["reward"]), target_rew))
            print(f"{seed:4d}  {arm:8s}  {str(got[arm][0]):>8s} (>= {target_acc:.1%})   "
                  f"{str(got[arm][1]):>8s} (>= {target_rew:.3f})")
        for i, ratios in ((0, ratios_acc), (1, ratios_rew)):
            o, s = got["ordered"][i], got["shuffled"][i]
            if o and s:
                ratios.append(o / s)
    for name, ratios in (("held-out accuracy", ratios_acc), ("training reward", ratios_rew)):
        if ratios:
            print(f"ordered/shuffled samples to target ({name}): " + ", ".join(f"{x:.2f}" for x in ratios)
                  + f"; mean {sum(ratios) / len(ratios):.2f} (goal <= 0.80)")
    ordering = [r for r in runs if r["arm"] == "ordered"]
    print(f"ordering pass: {ordering[0]['ordering_samples']} samples, "
          f"{sum(r['ordering_s'] for r in ordering) / len(ordering):.1f} s mean vs "
          f"{sum(r['train_s'] for r in ordering) / len(ordering):.1f} s training "
          f"({ordering[0]['low_variance_queries']} of {args.queries} queries low-variance at the start)")
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
