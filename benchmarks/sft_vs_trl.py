"""SFT step speed and peak memory: our SFT trainer (fused chunked loss) vs TRL's SFTTrainer, same everything.

Model: Qwen2.5-shaped, 2 layers, hidden 64, 4 heads / 2 KV heads, the full 151,936-row vocabulary (tied),
fp32, sdpa. Data: sequences of N random token ids, loss on every token, batch 1, no packing. Both sides
run through `trl.SFTTrainer` with identical `SFTConfig`s; only `compute_loss` differs. Each measurement
runs in a fresh process (peak RSS = that process's high-water mark); tokens/s is over the steps after the
first (warm-up).

    python benchmarks/sft_vs_trl.py                       # 4096 and 8192 both sides, 32768 ours
    python benchmarks/sft_vs_trl.py --tokens 4096 --steps 4 --gradient-checkpointing

The last line is the comparison to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 151_936


def step_timer():
    """A TrainerCallback timing each optimizer step (CUDA synchronised); `.step_times()` lists the seconds."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def _stamp(self, kind):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps.append((kind, time.perf_counter()))

        def on_step_begin(self, args, state, control, **kw):
            self._stamp("begin")

        def on_step_end(self, args, state, control, **kw):
            self._stamp("end")

        def step_times(self) -> list[float]:
            begins = [t for k, t in self.stamps if k == "begin"]
            ends = [t for k, t in self.stamps if k == "end"]
            return [e - b for b, e in zip(begins, ends)]

    return StepTimer()


def random_rows(tokens: int, rows: int, high: int = 151_643, seed: int = 1) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (tokens,), generator=g).tolist() for _ in range(rows)]


def sft_steps(model, tokenizer, impl: str, tokens: int, steps: int, *, gradient_checkpointing: bool = False,
              bf16: bool = False, callbacks=(), high: int = 151_643) -> list[float]:
    """`steps` SFT steps of one `tokens`-long row each through TRL's SFTTrainer: `impl` is `ours` (the fused
    chunked loss), `liger` (its Liger branch: needs CUDA and liger-kernel) or `trl` (SFTTrainer's own loss).
    Returns each step's seconds (the first is the warm-up)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from qwen_align.losses import install_fused_loss_forward
    from sft.trainer import FusedLossSFTTrainer

    if impl in ("ours", "liger"):  # installed once per model; the trainer's own install then keeps this choice
        install_fused_loss_forward(model, use_liger=impl == "liger")
    timer = step_timer()
    dataset = Dataset.from_dict({"input_ids": random_rows(tokens, steps, high)})
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-5, max_length=tokens,
            packing=False, assistant_only_loss=False, logging_steps=10_000, save_strategy="no", report_to="none",
            activation_checkpointing=gradient_checkpointing, dataloader_pin_memory=False, disable_tqdm=True, seed=0,
            bf16=bf16, use_cpu=not torch.cuda.is_available(),
        )
        cls = SFTTrainer if impl == "trl" else FusedLossSFTTrainer
        trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[timer, *callbacks])
        trainer.train()
    return timer.step_times()


def worker(impl: str, tokens: int, steps: int, gradient_checkpointing: bool, threads: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qwen_align.tokenizer import load_tokenizer

    # SFTTrainer wants a tokenizer only for its pad id here; the demo's serves, with no download.
    tokenizer = load_tokenizer(Path(__file__).resolve().parents[1] / "recipes" / "demo_data" / "tokenizer")

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=tokens,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    step_times = sft_steps(model, tokenizer, impl, tokens, steps, gradient_checkpointing=gradient_checkpointing)[1:]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "impl": impl, "tokens": tokens, "step_s": sum(step_times) / len(step_times),
        "tokens_per_s": tokens / (sum(step_times) / len(step_times)), "peak_gb": peak_gb,
    }


def measure(impl: str, tokens: int, steps: int, gc: bool, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--tokens", str(tokens), "--steps", str(steps),
           "--threads", str(threads)] + (["--gradient-checkpointing"] if gc else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"impl": impl, "tokens": tokens, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[4096, 8192])
    p.add_argument("--ours-only", type=int, nargs="*", default=[32768], help="lengths measured for ours alone")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens[0], args.steps, args.gradient_checkpointing, args.threads)))
        return

    gc = args.gradient_checkpointing
    parts = []
    for n in args.tokens:
        ours = measure("ours", n, args.steps, gc, args.threads)
        trl = measure("trl", n, args.steps, gc, args.threads)
        for r in (ours, trl):
            print(json.dumps(r), flush=True)
        if "error" in ours or "error" in trl:
            parts.append(f"{n} tok: failed ({ours.get('error') or trl.get('error')})")
            continue
        parts.append(
            f"{n} tok: ours {ours['tokens_per_s']:.0f} tok/s vs TRL {trl['tokens_per_s']:.0f} tok/s = "
            f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x; peak ours {ours['peak_gb']:.2f} GB vs TRL "
            f"{trl['peak_gb']:.2f} GB = {ours['peak_gb'] / trl['peak_gb']:.2f}x"
        )
    for n in args.ours_only:
        ours = measure("ours", n, args.steps, gc, args.threads)
        print(json.dumps(ours), flush=True)
        parts.append(f"{n} tok: ours {ours['tokens_per_s']:.0f} tok/s, peak {ours['peak_gb']:.2f} GB"
                     if "error" not in ours else f"{n} tok: ours failed ({ours['error']})")
    print(f"sft_vs_trl (gradient checkpointing {'on' if gc else 'off'}, {args.threads} threads): " + " | ".join(parts))


if __name__ == "__main__":
    main()
