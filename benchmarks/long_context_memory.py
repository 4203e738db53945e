"""Peak memory of one 32,768-token SFT step on CPU with the full Qwen2.5 vocabulary, through the SFT stage.

What runs is what a user runs: a published-layout checkpoint (the real Qwen2.5 tokenizer rebuilt from
dashscope's qwen.tiktoken, 151,936 embedding rows, tied), one chat conversation of more than 32,768 tokens
truncated to max_length 32,768 with its assistant mask, `qwen-align run` of one SFT stage for one optimizer
step with the fused chunked loss (fp32, sdpa, AdamW). The step runs in a fresh process; its peak RSS
(`resource.getrusage` high-water mark, which includes loading and tokenising) is the number. Goal: < 8 GB.

    python benchmarks/long_context_memory.py                    # hidden 256, 2 layers
    python benchmarks/long_context_memory.py --hidden 64 --layers 2 --no-fused-loss

The last line is the result to paste into docs/benchmarks.md.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VOCAB_ROWS = 151_936
TOKENS = 32_768


def prepare(folder: Path, hidden: int, layers: int, fused: bool, threads: int) -> Path:
    """The checkpoint, one long conversation and a one-step SFT recipe in `folder`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_align.checkpoints.published import save_checkpoint
    from qwen_align.tokenizer import build_qwen25_tokenizer

    tokenizer = build_qwen25_tokenizer()
    heads = max(hidden // 64, 2)
    config = Qwen2Config(vocab_size=VOCAB_ROWS, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                         max_position_embeddings=TOKENS, rope_theta=1e6, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    save_checkpoint(Qwen2ForCausalLM(config).to(torch.bfloat16), tokenizer, folder / "model", out_dtype="bfloat16")
    reply = " ".join(f"step {i}: {i * 7 % 1000} plus {i % 97} is {i * 7 % 1000 + i % 97}." for i in range(2200))
    conversation = {"messages": [{"role": "user", "content": "Count for me, at length."},
                                 {"role": "assistant", "content": reply}]}
    (folder / "long.jsonl").write_text(json.dumps(conversation) + "\n")
    stage = {"name": "sft", "kind": "sft", "data": {"sources": [{"path": str(folder / "long.jsonl")}]},
             "max_length": TOKENS, "packing": False, "per_device_train_batch_size": 1, "max_steps": 1,
             "save_steps": 100, "logging_steps": 1, "dtype": "float32", "attn_implementation": "sdpa",
             "fused_loss": fused, "learning_rate": 1e-5}
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({"model": str(folder / "model"), "run_dir": str(folder / "run"), "seed": 0,
                                  "stages": [stage]}))
    return recipe


def worker(recipe: Path, threads: int) -> dict:
    import torch

    from qwen_align import cli

    torch.set_num_threads(threads)
    start = time.perf_counter()
    code = cli.main(["run", str(recipe)])
    manifest = json.loads((recipe.parent / "run" / "manifest.json").read_text())
    lengths = manifest["stages"]["sft"]["metrics"]["lengths"]
    return {"exit": code, "tokens": lengths["tokens"], "seconds": round(time.perf_counter() - start, 1),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB -> GiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fused-loss", action="store_true", help="TRL's loss over full logits, for comparison")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker), args.threads)))
        return
    fused = not args.no_fused_loss
    with tempfile.TemporaryDirectory() as tmp:
        recipe = prepare(Path(tmp), args.hidden, args.layers, fused, args.threads)
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run([sys.executable, __file__, "--worker", str(recipe), "--threads", str(args.threads)],
                              capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        print(f"long_context_memory: failed ({(proc.stderr.strip().splitlines() or ['killed'])[-1]})")
        return
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(r))
    print(f"long_context_memory ({'fused' if fused else 'full-logits'} loss, hidden {args.hidden}, {args.layers} "
          f"layers, vocab {VOCAB_ROWS}, {args.threads} threads): one {r['tokens']}-token SFT step through the stage, "
          f"peak RSS {r['peak_gb']:.2f} GB (goal < 8 GB), {r['seconds']:.0f} s incl. loading")


if __name__ == "__main__":
    main()
