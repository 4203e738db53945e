"""Packed vs padded SFT batches: training tokens/s (forward + backward, our fused loss) of the same documents,
padded (one document per row, attention mask, sdpa) and packed into rows of `--max-length` (per-document
position_ids, no mask) under each attention implementation. The mean loss of both layouts is checked equal:
packed documents do not see each other. Prints one pasteable line.

    python benchmarks/packing.py                      # tiny preset, CPU
    python benchmarks/packing.py --preset 0.5b --max-length 8192 --docs 64 --impls sdpa flex_attention  # GPU

Documents: lengths drawn from a log-uniform spread between --min-doc and --max-length / 2, random ids.
Real tokens only are counted (padding is not).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def doc_lengths(n: int, low: int, high: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(n)]


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the documents in each row (what TRL's bfd does, without splitting)."""
    rows: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in rows if r[0] + lengths[i] <= max_length]
        if fits:
            best = min(fits, key=lambda r: max_length - r[0] - lengths[i])
            rows[rows.index(best)] = (best[0] + lengths[i], best[1] + [i])
        else:
            rows.append((lengths[i], [i]))
    return [r[1] for r in rows]


def batches(docs: list[torch.Tensor], max_length: int, pad_id: int, device) -> dict[str, list[dict]]:
    """The same documents as padded batches (rows of documents up to max_length tokens in all, padded to the
    longest) and as packed rows (one row per batch, per-document positions)."""
    packed, padded = [], []
    for idx in pack_rows([len(d) for d in docs], max_length):
        ids = torch.cat([docs[i] for i in idx])
        pos = torch.cat([torch.arange(len(docs[i])) for i in idx])
        labels = ids.masked_fill(pos == 0, -100)
        packed.append({"input_ids": ids[None].to(device), "position_ids": pos[None].to(device),
                       "labels": labels[None].to(device)})
        longest = max(len(docs[i]) for i in idx)
        rows = torch.full((len(idx), longest), pad_id)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for r, i in enumerate(idx):
            rows[r, : len(docs[i])], mask[r, : len(docs[i])] = docs[i], 1
        padded.append({"input_ids": rows.to(device), "attention_mask": mask.to(device),
                       "labels": rows.masked_fill(mask == 0, -100).to(device)})
    return {"packed": packed, "padded": padded}


def train_pass(model, batch_list, autocast) -> tuple[float, float]:
    """(seconds, mean loss over every predicted token) for forward + backward over the batches."""
    from qwen_align.losses import causal_lm_loss

    total, count = 0.0, 0
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for batch in batch_list:
        n = int((batch["labels"][:, 1:] != -100).sum())
        with autocast():
            loss, _ = causal_lm_loss(model, batch, num_items_in_batch=n, use_liger=False)
        loss.backward()
        total += float(loss.detach()) * n
        count += n
    sync()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, total / count


def packed_vs_padded(model, docs: list[torch.Tensor], max_length: int, pad_id: int, impls: list[str],
                     bf16: bool = False, repeats: int = 2) -> list[dict]:
    """One result per layout: padded (sdpa) and packed under each of `impls`; the first pass warms up."""
    device = next(model.parameters()).device
    made = batches(docs, max_length, pad_id, device)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext)
    tokens = sum(len(d) for d in docs)
    results = []
    for layout, impl in [("padded", "sdpa")] + [("packed", i) for i in impls]:
        if impl == "flex_attention" and device.type == "cpu":
            results.append({"layout": layout, "attn": impl, "skipped": "flex_attention has no backward on CPU"})
            continue
        model.set_attn_implementation(impl)
        train_pass(model, made[layout][:1], autocast)  # warm-up (flex_attention compiles here)
        times, loss = [], None
        for _ in range(repeats):
            seconds, loss = train_pass(model, made[layout], autocast)
            times.append(seconds)
        best = min(times)
        results.append({"layout": layout, "attn": impl, "tokens": tokens, "rows": sum(b["input_ids"].shape[0]
                        for b in made[layout]), "seconds": best, "tokens_per_s": tokens / best, "loss": loss})
    return results


def summary_line(results: list[dict], what: str) -> str:
    base = next(r for r in results if r["layout"] == "padded")
    parts = [f"{r['layout']} {r['attn']} " + (f"skipped ({r['skipped']})" if "skipped" in r else
             f"{r['tokens_per_s']:.0f} tok/s (x{r['tokens_per_s'] / base['tokens_per_s']:.2f})") for r in results]
    gap = max(abs(r["loss"] - base["loss"]) for r in results if "loss" in r)
    return f"packing ({what}): " + " | ".join(parts) + f"; max loss difference vs padded {gap:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--min-doc", type=int, default=32)
    p.add_argument("--impls", nargs="+", default=["sdpa", "eager", "flex_attention"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from qwen_align.model import load_model
    from qwen_align.tokenizer import load_tokenizer

    tok = load_tokenizer(REPO / "recipes" / "demo_data" / "tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.preset, "policy", tokenizer=tok, dtype="float32", attn_implementation="sdpa", seed=0)
    model = model.to(device).train()
    g = torch.Generator().manual_seed(0)
    lengths = doc_lengths(args.docs, args.min_doc, args.max_length // 2)
    docs = [torch.randint(3, len(tok), (n,), generator=g) for n in lengths]
    results = packed_vs_padded(model, docs, args.max_length, tok.pad_token_id, args.impls, args.bf16)
    where = "cuda" if device == "cuda" else f"cpu x{args.threads}"
    print(summary_line(results, f"{args.preset}, {args.docs} docs {min(lengths)}-{max(lengths)} tokens into rows of "
                       f"{args.max_length}, {'bf16' if args.bf16 else 'fp32'}, {where}"))


if __name__ == "__main__":
    main()
