"""Does reward-variance ordering help GRPO? Ordered vs shuffled queries on the demo task, several seeds.

Same policy start, same query set, same number of rollouts per arm: the ordered arm trains on its initial
ordering pass's samples and re-ranks from the training rollouts (the stage's defaults), so it samples nothing
the shuffled arm does not. Per arm and seed: the training reward (verifier pass rate of the sampled responses)
and the held-out greedy accuracy against samples consumed, and the samples needed to reach a target held-out
accuracy. `--arms ... stale` adds the older arm (one ordering made before training, replayed every pass, its
samples not trained on: extra rollouts); `no-cache` is the ordered arm without training on its samples;
`whole-pass` samples the whole set before training (no windows); `ordered-noskip` / `shuffled-noskip` take
the optimizer step on batches without gradient too (TRL's behaviour).

`--hard N --easy M` mix N unanswerable (6-digit products: every sample fails) and M trivial (repeat a number:
every sample passes) queries into the set: the regime where many groups give GRPO no gradient, which is what
the ordering is meant to skip.

    python benchmarks/grpo_ordering.py --policy runs/demo/dpo/final [--seeds 0 1 2] [--steps 60] [--hard 128]

Rewards: the demo verifier (`exact`) only, so runs need no trained reward model.
"""

from __future__ import annotations

import argparse
import json
import random
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
from grpo.stage import make_trainer, ordering_metrics  # noqa: E402
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
        self.zero_std: list[float] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            self.reward.append((state.global_step * self.samples_per_step, float(logs["reward"])))
        if logs and "frac_reward_zero_std" in logs:
            self.zero_std.append(float(logs["frac_reward_zero_std"]))

    def zero_std_fraction(self) -> float:
        """The share of trained groups whose rewards were all equal (no GRPO gradient)."""
        return sum(self.zero_std) / max(len(self.zero_std), 1)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every == 0:
            acc = task_accuracy(self.model_ref(), self.tokenizer, self.heldout, max_new_tokens=8)["accuracy"]
            self.accuracy.append((state.global_step * self.samples_per_step, acc))


SYSTEM = {"role": "system", "content": "Answer with the number only."}


def query_set(args, tmp) -> Path:
    """The first `--queries` demo prompts, plus `--hard` unanswerable and `--easy` trivial ones, shuffled once."""
    rows = [json.loads(line) for line in (DEMO / "prompts.jsonl").read_text().splitlines()][: args.queries]
    rng = random.Random(1234)
    for _ in range(args.hard):
        a, b = rng.randrange(100_000, 999_999), rng.randrange(100_000, 999_999)
        rows.append({"messages": [SYSTEM, {"role": "user", "content": f"What is {a}*{b}?"}], "verifier": "exact",
                     "answer": str(a * b)})
    for _ in range(args.easy):
        a = rng.randrange(1, 9)
        rows.append({"messages": [SYSTEM, {"role": "user", "content": f"What is {a}+0?"}], "verifier": "exact",
                     "answer": str(a)})
    rng.shuffle(rows)
    path = Path(tmp) / "queries.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ARMS = {  # arm: the stage keys it sets
    "ordered": {"order_by_reward_variance": True},  # the first pass ranked window by window (the default)
    "whole-pass": {"order_by_reward_variance": True, "ordering_window": None},  # the whole set sampled first
    "shuffled": {"order_by_reward_variance": False},
    "stale": {"order_by_reward_variance": True, "reorder_each_epoch": False, "train_on_ordering_samples": False},
    "no-cache": {"order_by_reward_variance": True, "train_on_ordering_samples": False},
    # as ordered / shuffled, but AdamW steps on batches with no gradient too (TRL's behaviour)
    "ordered-noskip": {"order_by_reward_variance": True, "skip_steps_without_gradient": False},
    "shuffled-noskip": {"order_by_reward_variance": False, "skip_steps_without_gradient": False},
}


def one_run(policy_dir, arm, seed, args, heldout, tmp, queries_path):
    set_seed(seed)
    ordered = ARMS[arm]["order_by_reward_variance"]
    tokenizer = load_tokenizer(policy_dir)
    raw = {"model": str(policy_dir), "run_dir": str(tmp), "seed": seed, "stages": [{
        "name": "grpo", "kind": "grpo", "data": {"sources": [{"path": str(queries_path)}]},
        "rewards": [{"kind": "verifier"}], **ARMS[arm],
        **({"low_variance_policy": args.low_variance_policy} if ordered else {}),
        **({"ordering_window": None} if args.low_variance_policy == "drop" and ordered else {}),
        "per_device_train_batch_size": args.queries_per_step * 8, "gradient_accumulation_steps": 1,
        "max_steps": args.steps, "learning_rate": args.lr, "max_completion_length": 6, "logging_steps": 1,
        "save_steps": 10_000, "dtype": "float32", "lr_scheduler_type": "constant"}]}
    recipe = validate_recipe(raw, "benchmark")
    stage = recipe.stage("grpo")
    context = StageContext(recipe, Path(tmp) / f"{arm}-{seed}", str(policy_dir), None, Path(tmp) / "metrics.jsonl")
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
    cost = ordering_metrics(schedule, trainer, out.metrics["train_runtime"], "") if schedule is not None else {}
    return {
        "arm": arm, "seed": seed, "start_accuracy": start,
        "reward": curve.reward, "accuracy": [(0, start)] + curve.accuracy,
        "train_s": round(out.metrics["train_runtime"], 1), "ordering_s": cost.get("ordering_seconds", 0.0),
        "ordering_only": cost.get("rollouts_for_ordering_only", 0),
        "low_variance_queries": schedule.rounds[0]["low_variance"] if schedule is not None else None,
        "queries": len(queries), "zero_std_fraction": curve.zero_std_fraction(),
        "steps_skipped": trainer.step_skipper.skipped if trainer.step_skipper is not None else 0,
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
    p.add_argument("--queries", type=int, default=256, help="demo prompts in the query set")
    p.add_argument("--hard", type=int, default=0, help="add this many unanswerable queries")
    p.add_argument("--easy", type=int, default=0, help="add this many trivial queries")
    p.add_argument("--arms", nargs="+", default=["ordered", "shuffled"], choices=list(ARMS),
                   help="ordered (the defaults), shuffled, stale (one ordering before training, replayed every "
                   "pass, its samples not trained on), no-cache (ordered, its samples not trained on)")
    p.add_argument("--low-variance-policy", default="last", choices=["last", "drop", "rescore"])
    p.add_argument("--queries-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write all curves as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    heldout = load_eval_rows(str(DEMO / "heldout.jsonl"), args.heldout)
    runs = []
    arms = args.arms
    with tempfile.TemporaryDirectory() as tmp:
        queries_path = query_set(args, tmp)
        for seed in args.seeds:
            for arm in arms:
                r = one_run(args.policy, arm, seed, args, heldout, tmp, queries_path)
                runs.append(r)
                print(f"seed {seed} {r['arm']:8s} acc {r['accuracy'][0][1]:.1%} -> {r['accuracy'][-1][1]:.1%}  "
                      f"final reward(10-step mean) {smooth(r['reward'])[-1][1]:.3f}  zero-std groups "
                      f"{r['zero_std_fraction']:.0%}  steps skipped {r['steps_skipped']}  train {r['train_s']} s  ordering {r['ordering_s']} s, "
                      f"{r['ordering_only']} samples not trained on", flush=True)
    # Targets: per seed, the midpoint between the start accuracy and the best any arm reached; for the
    # training reward, 90% of the best smoothed reward any arm reached.
    print("\nseed  arm       samples to target acc   samples to target reward")
    ratios_acc, ratios_rew = [], []
    for seed in args.seeds:
        group = {r["arm"]: r for r in runs if r["seed"] == seed}
        start = next(iter(group.values()))["start_accuracy"]
        target_acc = start + 0.5 * (max(v for r in group.values() for _, v in r["accuracy"]) - start)
        target_rew = 0.9 * max(v for r in group.values() for _, v in smooth(r["reward"]))
        got = {}
        for arm, r in group.items():
            got[arm] = (samples_to(r["accuracy"], target_acc), samples_to(smooth(r["reward"]), target_rew))
            print(f"{seed:4d}  {arm:8s}  {str(got[arm][0]):>8s} (>= {target_acc:.1%})   "
                  f"{str(got[arm][1]):>8s} (>= {target_rew:.3f})")
        for i, ratios in ((0, ratios_acc), (1, ratios_rew)):
            o, s = got.get("ordered", (None, None))[i], got.get("shuffled", (None, None))[i]
            if o and s:
                ratios.append(o / s)
    for name, ratios in (("held-out accuracy", ratios_acc), ("training reward", ratios_rew)):
        if ratios:
            print(f"ordered/shuffled samples to target ({name}), seeds where both reached it: "
                  + ", ".join(f"{x:.2f}" for x in ratios) + f"; mean {sum(ratios) / len(ratios):.2f}")
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        mean = lambda key: sum(key(r) for r in rs) / len(rs)  # noqa: E731
        print(f"{arm:8s} mean held-out {mean(lambda r: r['start_accuracy']):.1%} -> "
              f"{mean(lambda r: r['accuracy'][-1][1]):.1%}, "
              f"zero-std groups {mean(lambda r: r['zero_std_fraction']):.0%}, "
              f"ordering {mean(lambda r: r['ordering_s']):.1f} s of {mean(lambda r: r['train_s']):.1f} s training, "
              f"{mean(lambda r: r['ordering_only']):.0f} samples not trained on")
    low = [r["low_variance_queries"] for r in runs if r["low_variance_queries"] is not None]
    if low:
        print(f"{low[0]} of {runs[0]['queries']} queries zero-variance at the start (seed {args.seeds[0]})")
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
