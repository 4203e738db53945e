"""DPO optimizer ablation on the demo task: AdamW vs OnDARE vs OnTIES after the same SFT checkpoint.

Reward side: held-out pair accuracy (implicit reward β·log π/π_ref ranks chosen first). Tax side: held-out
task accuracy (greedy, verified, recipes/demo_data/heldout.jsonl) and the NLL of the held-out true answers.

    python benchmarks/dpo_ablation.py --sft runs/demo/sft/final --pairs runs/demo/rejection_sampling/final/pairs

Pairs come from --pairs (a rejection_sampling output: JSONL or a folder), else they are built here the same
way: the SFT model samples 8 answers per prompt of recipes/demo_data/prompts.jsonl at temperature 1, the
verifier splits them, each prompt with a correct and a wrong answer gives one pair. Each run goes through the
real `dpo` stage (`run_recipe`); the base for τ_r is the tiny preset with the SFT recipe's seed (--base-seed).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen_align.data import iter_rows  # noqa: E402
from qwen_align.generation import SamplingParams, generate, load_eval_rows, prompt_messages  # noqa: E402
from qwen_align.model import load_model, save_checkpoint  # noqa: E402
from qwen_align.recipe import load_recipe  # noqa: E402
from qwen_align.runner import run_recipe  # noqa: E402
from qwen_align.tokenizer import load_tokenizer  # noqa: E402
from qwen_align.verifiers import verify  # noqa: E402

DEMO = REPO / "recipes" / "demo_data"

# name -> dpo stage options (on top of COMMON)
CONFIGS = {
    "adamw": {"optimizer": "adamw"},
    "ondare (paper p=0.01, a=1e-7)": {"variant": "ondare", "reserve_rate": 0.01, "merge_alpha": 1e-7},
    "onties (paper p=0.01, a=1e-7)": {"variant": "onties", "reserve_rate": 0.01, "merge_alpha": 1e-7},
    "ondare (demo p=0.1, a=1e-3)": {"variant": "ondare", "reserve_rate": 0.1, "merge_alpha": 1e-3},
    "onties (demo p=0.1, a=1e-3)": {"variant": "onties", "reserve_rate": 0.1, "merge_alpha": 1e-3},
}


def build_pairs(sft_dir: str, out: Path, seed: int) -> Path:
    tokenizer = load_tokenizer(sft_dir)
    model = load_model(sft_dir, "policy")
    rows = [r.data for r in iter_rows(DEMO / "prompts.jsonl")]
    torch.manual_seed(seed)
    samples = generate(model, tokenizer, [prompt_messages(r) for r in rows],
                       SamplingParams(max_new_tokens=8, temperature=1.0, num_return_sequences=8), batch_size=128)
    rng = random.Random(seed)
    pairs = []
    for row, responses in zip(rows, samples):
        good = [s for s in responses if verify(row, s).passed]
        bad = [s for s in responses if not verify(row, s).passed]
        if good and bad:
            pairs.append({"prompt": prompt_messages(row),
                          "chosen": [{"role": "assistant", "content": rng.choice(good).strip()}],
                          "rejected": [{"role": "assistant", "content": rng.choice(bad).strip()}]})
    correct = sum(verify(r, s).passed for r, rs in zip(rows, samples) for s in rs)
    print(f"sampled {len(rows)}x8: {correct / (8 * len(rows)):.1%} correct, {len(pairs)} pairs")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return out


@torch.no_grad()
def answer_nll(model, tokenizer, rows) -> float:
    """Mean per-token NLL of the true answer (+ <|im_end|>) after each held-out prompt (one padded batch)."""
    model.eval()
    seqs, spans = [], []
    for row in rows:
        prompt = tokenizer.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(str(row["answer"]) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        seqs.append(p_ids + a_ids)
        spans.append((len(p_ids), len(p_ids) + len(a_ids)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    total, count = 0.0, 0
    for i, (a, b) in enumerate(spans):
        targets = ids[i, a:b]
        total -= float(logp[i, a - 1 : b - 1].gather(-1, targets[:, None]).sum())
        count += b - a
    return total / count


def run_one(name: str, opts: dict, args, seed: int, pairs: Path, base_dir: Path, work: Path) -> dict:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    run_dir = work / f"{slug}-lr{args.lr:g}-nll{args.nll_weight:g}-s{seed}"
    stage = {
        "name": "dpo", "kind": "dpo", "init_from": args.sft, "base_model": str(base_dir),
        "data": {"sources": [{"path": str(pairs)}]}, "eval_fraction": 0.2,
        "task_eval": {"path": str(DEMO / "heldout.jsonl"), "max_new_tokens": 8, "batch_size": 200},
        "learning_rate": args.lr, "beta": 0.1, "nll_weight": args.nll_weight, "num_train_epochs": args.epochs,
        "per_device_train_batch_size": 32, "max_length": 128, "dtype": "float32", "logging_steps": 1000,
        "save_steps": 10_000, "lr_scheduler_type": "constant", **opts,
    }
    recipe = {"model": "tiny", "tokenizer": str(DEMO / "tokenizer"), "run_dir": str(run_dir), "seed": seed,
              "stages": [stage]}
    path = run_dir.with_suffix(".yaml")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    start = time.time()
    entry = run_recipe(load_recipe(path))["stages"]["dpo"]
    m = entry["metrics"]
    tokenizer = load_tokenizer(entry["output"])
    model = load_model(entry["output"], "policy")
    nll = answer_nll(model, tokenizer, load_eval_rows(str(DEMO / "heldout.jsonl")))
    return {"pair_acc": m["heldout_pair_accuracy"], "logp_acc": m["heldout_pairs"]["after"]["logp_accuracy"],
            "logp_acc_sft": m["heldout_pairs"]["before"]["logp_accuracy"],
            "task_acc": m["heldout_accuracy"], "nll": nll, "steps": m["train_steps"], "seconds": time.time() - start}


def sft_baseline(sft_dir: str) -> dict:
    from qwen_align.generation import task_accuracy

    tokenizer, model = load_tokenizer(sft_dir), load_model(sft_dir, "policy")
    rows = load_eval_rows(str(DEMO / "heldout.jsonl"))
    acc = task_accuracy(model, tokenizer, rows, max_new_tokens=8, batch_size=200)["accuracy"]
    return {"task_acc": acc, "nll": answer_nll(model, tokenizer, rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default=str(REPO / "runs" / "demo" / "sft" / "final"), help="SFT checkpoint (the demo's)")
    parser.add_argument("--pairs", default=None, help="rejection-sampled pairs (JSONL or folder); default: build")
    parser.add_argument("--work", default="/tmp/dpo_ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base-seed", type=int, default=0, help="the SFT recipe's seed (rebuilds its init)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--nll-weight", type=float, default=0.0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="names from CONFIGS")
    args = parser.parse_args()
    args.sft = str(Path(args.sft).resolve())  # the runs' recipes live in --work, elsewhere
    args.pairs = str(Path(args.pairs).resolve()) if args.pairs else None
    torch.set_num_threads(2)
    work = Path(args.work)
    tokenizer = load_tokenizer(args.sft)
    base_dir = work / f"base-tiny-seed{args.base_seed}"
    if not base_dir.exists():
        save_checkpoint(load_model("tiny", "policy", tokenizer=tokenizer, seed=args.base_seed), tokenizer, base_dir)
    pairs = Path(args.pairs) if args.pairs else work / "pairs.jsonl"
    if not pairs.exists():
        build_pairs(args.sft, pairs, seed=0)

    baseline = sft_baseline(args.sft)
    results: dict[str, list[dict]] = {}
    for name in args.configs:
        for seed in args.seeds:
            r = run_one(name, CONFIGS[name], args, seed, pairs, base_dir, work / "runs")
            results.setdefault(name, []).append(r)
            print(f"{name} seed {seed}: {r}", flush=True)

    def cell(values, fmt):
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{fmt.format(mean)} ± {fmt.format(spread)}"

    print(f"\nSFT start: task accuracy {baseline['task_acc']:.1%}, answer NLL {baseline['nll']:.3f}")
    print(f"LR {args.lr:g}, nll_weight {args.nll_weight:g}, epochs {args.epochs:g}, seeds {args.seeds}\n")
    print("| optimizer | held-out pair acc. | policy prefers chosen (SFT -> DPO) | held-out task acc. | answer NLL "
          "| steps | s/run |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        print(f"| {name} | {cell([r['pair_acc'] for r in rs], '{:.1%}')} "
              f"| {statistics.mean(r['logp_acc_sft'] for r in rs):.1%} -> {cell([r['logp_acc'] for r in rs], '{:.1%}')} "
              f"| {cell([r['task_acc'] for r in rs], '{:.1%}')} | {cell([r['nll'] for r in rs], '{:.3f}')} "
              f"| {rs[0]['steps']} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    (work / "results.json").write_text(json.dumps({"baseline": baseline, "results": results, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
