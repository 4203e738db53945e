"""Micro benchmark of the LM-head cross-entropy: forward + backward time and peak RSS.

Variants (each run in a fresh subprocess so ``ru_maxrss`` is its own peak):

* ``ours``  - ``qwen_align.losses.fused_linear_cross_entropy`` (default chunk unless ``--chunk``)
* ``trl``   - TRL's ``ChunkedLogProbFunction`` called the way ``trl.trainer.utils.add_fused_lm_head`` calls it for
  ``SFTTrainer`` (``outputs=("log_probs", "entropy", "is_top1")``, vocab tile ``_CHUNKED_LOGPROB_CHUNK_SIZE``; on CPU
  every position is scored, not only the valid ones)
* ``plain`` - ``F.cross_entropy(hidden @ W.T, labels)`` on the full logits (only for N <= 4096)
* ``model-ours`` / ``model-trl`` - one whole training step (forward, backward, AdamW) of a tiny full-vocab Qwen2
  (2 layers, hidden H, 4 heads / 2 KV heads, intermediate 4H, tied embeddings) on one N-token sequence, with
  ``causal_lm_loss`` vs. TRL's ``add_fused_lm_head`` forward as ``SFTTrainer`` patches it (not run by default)

Usage::

    python benchmarks/fused_ce_micro.py                 # N=4096 and 8192, H=64, V=151936, fp32
    python benchmarks/fused_ce_micro.py --sweep 64,128,256,512,1024   # our chunk-size sweep
    python benchmarks/fused_ce_micro.py --tokens 32768 --variants ours
    python benchmarks/fused_ce_micro.py --variants model-ours,model-trl --reps 2

``rss_base`` is the process RSS after building the inputs (interpreter + torch + tensors); ``rss_peak`` is
``ru_maxrss``; ``extra`` = peak - base is what the loss itself added.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(variant: str, n: int, h: int, v: int, chunk: int | None, reps: int, ignore_frac: float, threads: int):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden = torch.randn(n, h).requires_grad_()
    weight = (torch.randn(v, h) * 0.02).requires_grad_()  # HF initializer_range
    labels = torch.randint(0, v, (n,))
    if ignore_frac > 0:
        labels[torch.rand(n) < ignore_frac] = -100

    if variant == "ours":
        sys.path.insert(0, REPO_ROOT)
        from qwen_align.losses import default_chunk_size, fused_linear_cross_entropy

        used_chunk = chunk or default_chunk_size(v)

        def step():
            loss, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
            loss.backward()
            return loss

    elif variant == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        used_chunk = _CHUNKED_LOGPROB_CHUNK_SIZE

        def step():
            # As add_fused_lm_head on a non-Triton device: all positions scored, labels clamped, masked afterwards.
            mask = labels != -100
            log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
                hidden,
                weight,
                None,
                labels.clamp(min=0),
                1.0,
                _CHUNKED_LOGPROB_CHUNK_SIZE,
                None,
                1.0,
                ("log_probs", "entropy", "is_top1"),
            )
            log_probs = log_probs.masked_fill(~mask, 0)
            loss = -log_probs.sum() / mask.sum().clamp(min=1)
            loss.backward()
            return loss

    elif variant in ("model-ours", "model-trl"):
        # One full training step (forward, backward, AdamW) of the tiny full-vocab Qwen2 the SFT stage is measured on.
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=v,
            hidden_size=h,
            intermediate_size=4 * h,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=max(n, 4096),
        )
        model = Qwen2ForCausalLM(config)
        model.train()
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
        input_ids = torch.randint(0, v, (1, n))
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if variant == "model-ours":
            sys.path.insert(0, REPO_ROOT)
            from qwen_align.losses import causal_lm_loss, default_chunk_size

            used_chunk = chunk or default_chunk_size(v)

            def step():
                loss, _ = causal_lm_loss(model, batch, chunk_size=chunk)
                loss.backward()
                optim.step()
                optim.zero_grad(set_to_none=True)
                return loss

        else:
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, add_fused_lm_head

            used_chunk = _CHUNKED_LOGPROB_CHUNK_SIZE
            add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does

            def step():
                loss = model(**batch, fused_lm_head=True).loss
                loss.backward()
                optim.step()
                optim.zero_grad(set_to_none=True)
                return loss

    elif variant == "plain":
        used_chunk = None

        def step():
            loss = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
            loss.backward()
            return loss

    else:
        raise ValueError(variant)

    rss_base = _rss_now_mb()
    times = []
    loss = None
    for _ in range(reps):
        hidden.grad = None
        weight.grad = None
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "variant": variant,
        "n": n,
        "chunk": used_chunk,
        "time_min": min(times),
        "times": times,
        "rss_base_mb": rss_base,
        "rss_peak_mb": peak,
        "extra_mb": peak - rss_base,
        "loss": float(loss.detach()),
    }


def run_variant(variant, n, h, v, chunk=None, reps=3, ignore_frac=0.0, threads=2):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        variant,
        "--tokens",
        str(n),
        "--hidden",
        str(h),
        "--vocab",
        str(v),
        "--reps",
        str(reps),
        "--ignore-frac",
        str(ignore_frac),
        "--threads",
        str(threads),
    ]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(r):
    return (
        f"  {r['variant']:5s} N={r['n']:6d} chunk={r['chunk']!s:>6s} time={r['time_min']:.2f}s "
        f"(all: {', '.join(f'{t:.2f}' for t in r['times'])}) peak_rss={r['rss_peak_mb']:.0f}MiB "
        f"(+{r['extra_mb']:.0f} over base {r['rss_base_mb']:.0f}) loss={r['loss']:.4f}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=str, default="4096,8192")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ignore-frac", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", type=str, default="ours,trl,plain")
    p.add_argument("--plain-max-tokens", type=int, default=4096)
    p.add_argument("--sweep", type=str, default=None, help="comma-separated chunk sizes for `ours`")
    args = p.parse_args()

    if args.worker:
        res = _worker(
            args.worker,
            int(args.tokens),
            args.hidden,
            args.vocab,
            args.chunk,
            args.reps,
            args.ignore_frac,
            args.threads,
        )
        print(json.dumps(res))
        return

    tokens = [int(x) for x in args.tokens.split(",")]
    common = dict(h=args.hidden, v=args.vocab, reps=args.reps, ignore_frac=args.ignore_frac, threads=args.threads)
    print(f"H={args.hidden} V={args.vocab} fp32 threads={args.threads} reps={args.reps} ignore_frac={args.ignore_frac}")

    if args.sweep:
        for n in tokens:
            for c in [int(x) for x in args.sweep.split(",")]:
                print(_fmt(run_variant("ours", n, chunk=c, **common)), flush=True)
        return

    variants = args.variants.split(",")
    for n in tokens:
        results = {}
        for variant in variants:
            if variant == "plain" and n > args.plain_max_tokens:
                continue
            results[variant] = r = run_variant(variant, n, chunk=args.chunk if variant in ("ours", "model-ours") else None, **common)
            print(_fmt(r), flush=True)
        line = f"N={n}:"
        for mine, others in (("ours", ("trl", "plain")), ("model-ours", ("model-trl",))):
            if mine not in results:
                continue
            o = results[mine]
            line += f" {mine} {o['time_min']:.2f}s {o['rss_peak_mb']:.0f}MiB"
            for other in others:
                if other in results:
                    r = results[other]
                    line += (
                        f" | vs {other} ({r['time_min']:.2f}s {r['rss_peak_mb']:.0f}MiB):"
                        f" speedup {r['time_min'] / o['time_min']:.2f}x,"
                        f" peak-RSS ratio {o['rss_peak_mb'] / r['rss_peak_mb']:.2f},"
                        f" extra-RSS ratio {o['extra_mb'] / max(r['extra_mb'], 1):.3f},"
                        f" |dloss| {abs(o['loss'] - r['loss']):.1e}"
                    )
        print("SUMMARY " + line, flush=True)


if __name__ == "__main__":
    main()
