"""Reward-model eval throughput: pairs/s with length-sorted batches vs the data's own order, same data,
same tiny RM (the `tiny` preset, random init, demo tokenizer), one run each. Prints one pasteable line.

    python benchmarks/rm_eval_throughput.py [--pairs 256] [--batch-size 16] [--max-length 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_items(n: int, seed: int = 0):
    """Pairs of very different lengths (as in real benchmarks): short arithmetic to long explanations."""
    from qwen_align.rm_eval.items import Item

    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        filler = " ".join(rng.choice(["first", "add", "the", "tens", "then", "ones", "carry"])
                          for _ in range(rng.choice([2, 8, 30, 120])))
        items.append(Item(id=str(i), subset="pairs", prompt=[{"role": "user", "content": f"What is {a}+{b}?"}],
                          responses=[f"{filler} {a + b}", f"{filler} {a + b + 1}"]))
    return items


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from qwen_align.model import load_model, save_checkpoint
    from qwen_align.rm_eval.scorer import encode_items, load_reward_model, score_sequences
    from qwen_align.tokenizer import load_tokenizer

    tok = load_tokenizer(REPO / "recipes" / "demo_data" / "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(load_model("tiny", "reward", tokenizer=tok, seed=0), tok, Path(tmp) / "rm")
        model, tok, dtype = load_reward_model(Path(tmp) / "rm")
    enc = encode_items(make_items(args.pairs), tok, args.max_length)
    score_sequences(model, enc.sequences[:32], tok.pad_token_id, args.batch_size, progress=False)  # warm-up
    rates, results = {}, {}
    for sort in (True, False):
        start = time.perf_counter()
        results[sort] = score_sequences(model, enc.sequences, tok.pad_token_id, args.batch_size, sort, progress=False)
        rates[sort] = args.pairs / (time.perf_counter() - start)
    same = max(abs(x - y) for x, y in zip(results[True], results[False]))
    device = "cuda" if torch.cuda.is_available() else f"cpu x{args.threads} thread(s)"
    print(f"rm-eval throughput (tiny RM, {args.pairs} pairs, batch {args.batch_size}, max_length {args.max_length}, "
          f"{dtype}, {device}): length-sorted {rates[True]:.1f} pairs/s, unsorted {rates[False]:.1f} pairs/s, "
          f"speed-up x{rates[True] / rates[False]:.2f}, max score difference {same:.1e}")


if __name__ == "__main__":
    main()
