"""Reward-model training cost by kind: TRL's RewardTrainer on a scalar head (the library baseline) vs the
likelihood RM (`score: likelihood`, RewardTrainer with the response log-prob score), through the stage, on
the same start checkpoint, pairs, batch and step count, in one run (each kind twice, A-B-B-A). Prints one
pasteable line.

    python benchmarks/rm_score_kinds.py [--pairs 2048] [--steps 100] [--batch 32] [--threads 2] [--model tiny]

The pairs are the demo's shape (two-digit arithmetic, chosen = the true answer, rejected = a near miss);
`--filler N` puts N words of explanation before each answer, for longer responses.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def make_pairs(n: int, filler: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["first", "add", "the", "tens", "then", "ones", "carry"]
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        lead = " ".join(rng.choice(words) for _ in range(filler))
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "chosen": [{"role": "assistant", "content": f"{lead} {a + b}".strip()}],
                     "rejected": [{"role": "assistant", "content": f"{lead} {wrong}".strip()}]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--filler", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="tiny")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from qwen_align.recipe import load_recipe
    from qwen_align.runner import run_recipe

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs, args.filler)))
        common = {"kind": "reward_model", "data": {"sources": [{"path": str(data)}]}, "max_length": 512,
                  "per_device_train_batch_size": args.batch, "max_steps": args.steps, "learning_rate": 3e-4,
                  "eval_fraction": 0.0, "logging_steps": args.steps, "save_steps": 10 * args.steps, "dtype": "float32"}
        raw = {"model": args.model, "tokenizer": str(REPO / "recipes" / "demo_data" / "tokenizer"),
               "run_dir": str(Path(tmp) / "run"), "seed": 0,
               # A-B-B-A: each kind runs once early and once late, so warm-up favours neither
               "stages": [{"name": f"{kind}{i}", "score": kind, **common}
                          for i, kind in enumerate(["scalar", "likelihood", "likelihood", "scalar"])]}
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
        stages = run_recipe(load_recipe(recipe))["stages"]
    seconds = {kind: sum(e["metrics"]["train_runtime_s"] for name, e in stages.items() if name.startswith(kind)) / 2
               for kind in ("scalar", "likelihood")}
    device = "cuda" if torch.cuda.is_available() else f"cpu x{args.threads} thread(s)"
    print(f"rm training by kind ({args.model}, {args.steps} steps x {args.batch} pairs, filler {args.filler} words, "
          f"{device}): scalar head (TRL RewardTrainer) {seconds['scalar']:.1f} s, likelihood {seconds['likelihood']:.1f} s, "
          f"likelihood/scalar time x{seconds['likelihood'] / seconds['scalar']:.2f} (mean of 2 runs each, A-B-B-A)")


if __name__ == "__main__":
    main()
