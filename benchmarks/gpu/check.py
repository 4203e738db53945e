"""The chain's GPU paths in one run: SFT tokens/s, MFU and peak memory (our fused loss, its Liger branch, TRL's
default loss), 20 GRPO steps, rejection sampling, eval-rm on the RMB sample files, and packed vs padded SFT
batches, each with its correctness checks. Prints one table and writes JSON.

    bash benchmarks/gpu/check.sh                         # on the device (one H200): the whole plan, <= 8 minutes
    python benchmarks/gpu/check.py --cpu-smoke --json X  # the same code paths, tiny shapes, on CPU (tests run it)

Each measurement runs on its own: a failure prints its error line and the rest go on. A measurement whose
estimated time no longer fits the budget (`--budget-s`) is skipped with a note, so the run ends in time.

MFU. Model FLOPs of one training step (the ones a step needs, not the ones it runs: activation recomputation is
not counted):  6 * N * T  +  6 * L * h * sum(S_i^2)
  N: weights of the matmuls (q, k, v, o, gate, up, down and the LM head; the embedding lookup and norms are not
     matmuls), T: tokens in the step, L: layers, h: hidden size (= heads x head dim), S_i: each document's length.
  6 = forward 2 + backward 4 FLOPs per weight and token. Attention: QK^T and AV are 2 * S^2 * h FLOPs each in the
  forward, halved by the causal mask (what flash-attention computes), times 3 for forward + backward.
MFU = FLOPs / step seconds / peak, peak from `--peak-tflops` (default: the H200's dense bf16 figure measured
on the device, 790 TFLOP/s, an 8192^3 bf16 matmul; the datasheet says 989).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402

DEMO = REPO / "recipes" / "demo_data"
H200_BF16_TFLOPS = 790.0
BF16_LOSS_RTOL = 2e-2  # bf16 compute vs fp32 on the same weights and batch (a bf16 mantissa holds ~3 digits)


@dataclass
class Plan:
    """What one run measures; `gpu()` is the issue's plan, `smoke()` the same paths at tiny shapes."""

    device: str
    sft_presets: list[str]
    sft_lengths: list[int]
    sft_losses: list[str]
    sft_steps: int  # timed steps, after one warm-up step
    checkpointing_from: int  # activation checkpointing at this length and longer
    checkpoint_presets: list[str]  # presets whose trained SFT model is saved and reloaded
    grpo_preset: str
    grpo_steps: int
    grpo_batch: int  # completions per step (queries x 8)
    grpo_completion: int
    rs_preset: str
    rs_prompts: int
    rs_samples: int
    rs_new_tokens: int
    rm_preset: str
    rm_max_length: int
    rm_batch: int
    pack_preset: str
    pack_length: int
    pack_docs: int
    bf16: bool
    estimates: dict[str, float] = field(default_factory=dict)  # seconds, by measurement kind

    @staticmethod
    def gpu() -> Plan:
        return Plan(
            device="cuda", sft_presets=["0.5b", "1.5b"], sft_lengths=[8192, 32768], sft_losses=["ours", "liger", "trl"],
            sft_steps=3, checkpointing_from=32768, checkpoint_presets=["0.5b"],
            grpo_preset="0.5b", grpo_steps=20, grpo_batch=64, grpo_completion=128,
            rs_preset="0.5b", rs_prompts=256, rs_samples=8, rs_new_tokens=128,
            rm_preset="0.5b", rm_max_length=2048, rm_batch=16,
            pack_preset="0.5b", pack_length=8192, pack_docs=64, bf16=True,
            # First guesses, not readings: a row starts only if its estimate fits what is left of the budget.
            estimates={"sft:8192": 15, "sft:32768": 25, "grpo": 90, "rejection_sampling": 45, "eval_rm": 30,
                       "packing": 40},
        )

    @staticmethod
    def smoke() -> Plan:
        return Plan(
            device="cpu", sft_presets=["tiny"], sft_lengths=[32, 64], sft_losses=["ours", "liger", "trl"],
            sft_steps=1, checkpointing_from=64, checkpoint_presets=["tiny"],
            grpo_preset="tiny", grpo_steps=2, grpo_batch=16, grpo_completion=8,
            rs_preset="tiny", rs_prompts=16, rs_samples=4, rs_new_tokens=8,
            rm_preset="tiny", rm_max_length=128, rm_batch=16,
            pack_preset="tiny", pack_length=128, pack_docs=8, bf16=True,
            estimates={},
        )


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds


# ------------------------------------------------------------------ shared helpers


def tokenizer():
    from qwen_align.tokenizer import load_tokenizer

    return load_tokenizer(DEMO / "tokenizer")


def build_model(preset: str, role: str, tok, device: str, dtype: str = "float32", attn: str = "sdpa"):
    """A preset model, initialised directly on `device` (fast for a 1.5B model on a GPU)."""
    from qwen_align.model import load_model

    with torch.device(device):
        model = load_model(preset, role, tokenizer=tok, dtype=dtype, attn_implementation=attn, seed=0)
    return model.to(device)


def matmul_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_flops(model, doc_lengths: list[int]) -> float:
    """Model FLOPs of one training step over documents of these lengths (module docstring)."""
    c = model.config
    return 6 * matmul_weights(model) * sum(doc_lengths) + 6 * c.num_hidden_layers * c.hidden_size * sum(
        s * s for s in doc_lengths)


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's high-water mark, not this row's


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def autocast(device: str, bf16: bool):
    return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(b), 1e-6)


def grad_check_callback():
    """Records whether every gradient is finite just before each optimizer step."""
    from transformers import TrainerCallback

    class FiniteGrads(TrainerCallback):
        ok = True
        seen = 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.seen += bool(grads)
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else False
            self.ok = self.ok and finite  # one device sync per step

    return FiniteGrads()


def run_recipe(raw: dict, base: Path) -> tuple[dict, float]:
    """The project's runner on a recipe dict; (the manifest, seconds)."""
    from qwen_align.recipe import validate_recipe
    from qwen_align.runner import run_recipe as run

    recipe = validate_recipe(raw, str(base / "check.yaml"), base_dir=base)
    start = time.perf_counter()
    manifest = run(recipe)
    return manifest, time.perf_counter() - start


def prompt_file(n: int, folder: Path) -> Path:
    lines = (DEMO / "prompts.jsonl").read_text().splitlines()
    path = folder / f"prompts_{n}.jsonl"
    path.write_text("\n".join(lines[i % len(lines)] for i in range(n)) + "\n")
    return path


def stage_completed(manifest: dict, name: str) -> dict:
    entry = manifest["stages"][name]
    if entry.get("status") != "completed":
        raise RuntimeError(f"stage {name} ended {entry.get('status')}: {entry.get('error')}")
    return entry


def loads_as_causal_lm(folder: str) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ------------------------------------------------------------------ measurements


def sft_row(plan: Plan, preset: str, tokens: int, loss: str, tok) -> dict:
    from qwen_align.losses import causal_lm_loss, install_fused_loss_forward
    from sft_vs_trl import random_rows, sft_steps

    device = plan.device
    if loss == "liger":
        if device != "cuda":
            return {"status": "skipped", "note": "needs CUDA (Liger's Triton kernels)"}
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return {"status": "skipped", "note": "liger-kernel is not installed (benchmarks/gpu/gather_wheels.sh)"}
    free(device)
    model = build_model(preset, "policy", tok, device).train()
    high = min(len(tok), model.config.vocab_size)
    # Correctness first, on the fresh weights: the loss of one row in bf16 compute vs fp32.
    ids = torch.tensor(random_rows(tokens, 1, high, seed=7), device=device)
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        losses = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            with autocast(device, bf16):
                if loss == "trl":
                    losses[name] = float(model(**batch, use_cache=False).loss)
                else:
                    losses[name] = float(causal_lm_loss(model, batch, use_liger=loss == "liger")[0])
    if loss != "trl":
        install_fused_loss_forward(model, use_liger=loss == "liger")
    grads = grad_check_callback()
    reset_peak(device)
    times = sft_steps(model, tok, loss, tokens, plan.sft_steps + 1, gradient_checkpointing=tokens >= plan.checkpointing_from,
                      bf16=plan.bf16, callbacks=[grads], high=high)[1:]
    step_s = sum(times) / len(times)
    row = {
        "status": "ok", "tokens_per_s": tokens / step_s, "step_s": step_s,
        "tflops": train_flops(model, [tokens]) / step_s / 1e12, "peak_gb": peak_gb(device),
        "loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"],
        "checks": {"bf16_loss_vs_fp32": close(losses["bf16"], losses["fp32"], BF16_LOSS_RTOL),
                   "grads_finite": grads.ok and grads.seen > 0},
        "note": ("activation checkpointing; " if tokens >= plan.checkpointing_from else "") + f"{len(times)} timed step(s)",
    }
    if loss == "ours" and preset in plan.checkpoint_presets and tokens == plan.sft_lengths[0]:
        from qwen_align.model import load_model, save_checkpoint

        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(model, tok, folder)
            again = load_model(folder, "policy", tokenizer=tok, dtype="float32")
            name, want = next(iter(model.state_dict().items()))
            row["checks"]["checkpoint_loads"] = torch.equal(again.state_dict()[name].cpu(), want.detach().cpu())
    del model
    return row


def grpo_row(plan: Plan, tok, folder: Path) -> dict:
    """GRPO through the project's runner: the preset policy, verifier rewards, ordered queries, `grpo_steps` steps."""
    import trl

    folder.mkdir(parents=True, exist_ok=True)
    queries = plan.grpo_steps * plan.grpo_batch // 8 + plan.grpo_batch // 8
    spent = {"generation": 0.0}
    original = trl.GRPOTrainer._generate_single_turn

    def timed(self, *args, **kwargs):  # TRL's generation for the training batches, timed
        if plan.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            if plan.device == "cuda":
                torch.cuda.synchronize()
            spent["generation"] += time.perf_counter() - start

    raw = {
        "model": plan.grpo_preset, "tokenizer": str(DEMO / "tokenizer"), "run_dir": str(folder / "run"), "seed": 0,
        "stages": [{
            "name": "grpo", "kind": "grpo", "data": {"sources": [{"path": str(prompt_file(queries, folder))}]},
            "rewards": [{"kind": "verifier"}], "per_device_train_batch_size": plan.grpo_batch,
            "gradient_accumulation_steps": 1, "max_steps": plan.grpo_steps, "learning_rate": 1e-6,
            "max_completion_length": plan.grpo_completion, "ordering_batch_size": 64, "logging_steps": 5,
            "save_steps": 10_000, "dtype": "bfloat16" if plan.bf16 else "float32",
        }],
    }
    reset_peak(plan.device)
    trl.GRPOTrainer._generate_single_turn = timed
    try:
        manifest, seconds = run_recipe(raw, folder)
    finally:
        trl.GRPOTrainer._generate_single_turn = original
    entry = stage_completed(manifest, "grpo")
    m = entry["metrics"]
    runtime = m["train_runtime_s"]
    ordering_in_training = m.get("ordering_seconds", 0.0)  # the first round ran before train(); later ones inside
    samples = m["samples_consumed"]
    return {
        "status": "ok", "samples_per_s": samples / runtime, "generation_s": spent["generation"],
        "training_s": max(runtime - spent["generation"], 0.0), "ordering_s": ordering_in_training,
        "train_loss": m["train_loss"], "peak_gb": peak_gb(plan.device),
        "checks": {"loss_finite": math.isfinite(m["train_loss"]), "steps": m["train_steps"] == plan.grpo_steps,
                   "checkpoint_loads": loads_as_causal_lm(entry["output"])},
        "note": f"{plan.grpo_steps} steps x {plan.grpo_batch} completions of <= {plan.grpo_completion} tokens; "
                f"whole stage {seconds:.0f} s",
    }


def rejection_sampling_row(plan: Plan, tok, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    raw = {
        "model": plan.rs_preset, "tokenizer": str(DEMO / "tokenizer"), "run_dir": str(folder / "run"), "seed": 0,
        "stages": [{
            "name": "rejection_sampling", "kind": "rejection_sampling",
            "data": {"sources": [{"path": str(prompt_file(plan.rs_prompts, folder))}]},
            "samples_per_prompt": plan.rs_samples, "max_new_tokens": plan.rs_new_tokens, "batch_size": 64,
            "chunk_size": plan.rs_prompts, "backend": "transformers", "dtype": "bfloat16" if plan.bf16 else "float32",
        }],
    }
    reset_peak(plan.device)
    manifest, seconds = run_recipe(raw, folder)
    entry = stage_completed(manifest, "rejection_sampling")
    final = Path(entry["output"]).parent  # the stage's output is final/pairs; stats.json sits beside it
    stats = json.loads((final / "stats.json").read_text())
    items = plan.rs_prompts * plan.rs_samples
    return {
        "status": "ok", "items_per_s": items / seconds, "seconds": seconds, "peak_gb": peak_gb(plan.device),
        "checks": {"stats_written": bool(stats), "pairs_written": any(Path(entry["output"]).iterdir())},
        "note": f"{plan.rs_prompts} prompts x {plan.rs_samples} samples of <= {plan.rs_new_tokens} tokens, whole stage",
    }


def eval_rm_row(plan: Plan, tok, folder: Path, rmb: Path | None) -> dict:
    if rmb is None or not rmb.is_dir():
        return {"status": "skipped", "note": f"no RMB sample files at {rmb} (benchmarks/gpu/gather_wheels.sh copies them)"}
    from qwen_align.model import save_checkpoint
    from qwen_align.rm_eval.loaders import load_benchmark
    from qwen_align.rm_eval.report import evaluate

    folder.mkdir(parents=True, exist_ok=True)
    free(plan.device)
    rm = build_model(plan.rm_preset, "reward", tok, "cpu")
    save_checkpoint(rm, tok, folder / "rm")
    del rm
    items, _ = load_benchmark("rmb", rmb)
    reset_peak(plan.device)
    summary = evaluate(str(folder / "rm"), "rmb", str(rmb), str(folder / "out"), plan.rm_max_length, plan.rm_batch,
                       "bfloat16" if plan.bf16 else "float32", progress=False)
    scores = [json.loads(line) for line in (folder / "out" / "scores.jsonl").read_text().splitlines()]
    values = [v for r in scores for k in ("scores_chosen", "scores_rejected", "scores") if k in r
              for v in (r[k] if isinstance(r[k], list) else [r[k]])]
    return {
        "status": "ok", "items_per_s": len(items) / summary["scoring_seconds"], "seconds": summary["scoring_seconds"],
        "score": summary["score"], "peak_gb": peak_gb(plan.device),
        "checks": {"scores_finite": bool(values) and all(math.isfinite(v) for v in values),
                   "every_item_scored": len(scores) == len(items)},
        "note": f"{len(items)} RMB items, max_length {plan.rm_max_length}, batch {plan.rm_batch}, random-init RM",
    }


def packing_rows(plan: Plan, tok) -> list[tuple[str, dict]]:
    from packing import doc_lengths, packed_vs_padded

    free(plan.device)
    model = build_model(plan.pack_preset, "policy", tok, plan.device).train()
    lengths = doc_lengths(plan.pack_docs, 32, plan.pack_length // 2)
    g = torch.Generator().manual_seed(0)
    high = min(len(tok), model.config.vocab_size)
    docs = [torch.randint(3, high, (n,), generator=g) for n in lengths]
    reset_peak(plan.device)
    results = packed_vs_padded(model, docs, plan.pack_length, tok.pad_token_id, ["sdpa", "flex_attention"],
                               bf16=plan.bf16, repeats=1)
    peak = peak_gb(plan.device)  # the highest of the three layouts
    base = next(r for r in results if r["layout"] == "padded")
    flops = train_flops(model, lengths)
    rows = []
    for r in results:
        case = f"{plan.pack_preset} {r['layout']} {r['attn']}"
        if "skipped" in r:
            rows.append((case, {"status": "skipped", "note": r["skipped"]}))
            continue
        rows.append((case, {
            "status": "ok", "tokens_per_s": r["tokens_per_s"], "tflops": flops / r["seconds"] / 1e12,
            "loss": r["loss"], "peak_gb": peak, "checks": {"loss_equals_padded": close(r["loss"], base["loss"], 1e-2 if plan.bf16 else 1e-4)},
            "note": f"{len(lengths)} docs {min(lengths)}-{max(lengths)} tokens, {r['rows']} row(s) of <= {plan.pack_length}",
        }))
    del model
    return rows


# ------------------------------------------------------------------ the run


def measurements(plan: Plan, tok, work: Path, rmb: Path | None) -> list[tuple[str, str, str, Callable]]:
    """(section, case, estimate key, thunk) in the order they run: 8K SFT first (the MFU goal), then the other
    stages, then packing, then the 32K rows, so what a tight budget skips is the longest."""
    sft = [(p, n, loss) for n in plan.sft_lengths for p in plan.sft_presets for loss in plan.sft_losses]
    first = [s for s in sft if s[1] == plan.sft_lengths[0]]
    rest = [s for s in sft if s[1] != plan.sft_lengths[0]]
    make = lambda p, n, loss: ("sft", f"{p} {n} {loss}", f"sft:{n}", lambda: sft_row(plan, p, n, loss, tok))
    steps = [make(*s) for s in first]
    steps += [
        ("grpo", f"{plan.grpo_preset} {plan.grpo_steps} steps", "grpo", lambda: grpo_row(plan, tok, work / "grpo")),
        ("rejection_sampling", f"{plan.rs_preset} {plan.rs_prompts}x{plan.rs_samples}", "rejection_sampling",
         lambda: rejection_sampling_row(plan, tok, work / "rs")),
        ("eval_rm", f"{plan.rm_preset} RMB samples", "eval_rm", lambda: eval_rm_row(plan, tok, work / "rm", rmb)),
        ("packing", f"{plan.pack_preset} {plan.pack_length}", "packing", lambda: packing_rows(plan, tok)),
    ]
    steps += [make(*s) for s in rest]
    return steps


def run(plan: Plan, budget: Budget, rmb: Path | None, peak_tflops: float,
        on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Every measurement's rows; `on_row(rows so far)` after each, so a run killed at its limit keeps its JSON."""
    tok = tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (section, case, key, thunk) in enumerate(measurements(plan, tok, Path(tmp), rmb)):
            estimate = plan.estimates.get(key, 0.0)
            if not budget.fits(estimate):
                rows.append({"section": section, "case": case, "status": "skipped",
                             "note": f"does not fit the {budget.seconds:.0f} s budget (needs ~{estimate:.0f} s, "
                                     f"{budget.seconds - budget.elapsed():.0f} s left)"})
                continue
            start = time.perf_counter()
            try:
                result = thunk()
            except Exception as e:  # one failure is a row; the rest still run
                detail = traceback.format_exception_only(type(e), e)[-1].strip()
                print(f"[{section} {case}] failed: {detail}", file=sys.stderr, flush=True)
                result = {"status": "failed", "error": detail[:300]}
            produced = result if isinstance(result, list) else [(case, result)]
            for sub_case, r in produced:
                r = {"section": section, "case": sub_case, **r, "wall_s": time.perf_counter() - start}
                if "tflops" in r:
                    r["mfu"] = r["tflops"] / peak_tflops
                rows.append(r)
                print(f"[{section} {sub_case}] {r['status']} {r.get('note') or r.get('error') or ''}", flush=True)
            free(plan.device)
            on_row(rows)
    return rows


def fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ["section", "case", "status", "rate", "MFU", "peak GB", "checks", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rate = (f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else
                f"{r['samples_per_s']:,.1f} samples/s" if "samples_per_s" in r else
                f"{r['items_per_s']:,.1f} items/s" if "items_per_s" in r else "")
        checks = r.get("checks") or {}
        check_text = ("all pass" if checks and all(checks.values()) else
                      ", ".join(f"{k} FAIL" for k, v in checks.items() if not v))
        note = r.get("error") or r.get("note") or ""
        if "generation_s" in r:
            note = f"generation {r['generation_s']:.1f} s, training {r['training_s']:.1f} s; " + note
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        lines.append("| " + " | ".join([r["section"], r["case"], r["status"], rate, mfu, fmt(r.get("peak_gb"), ".2f"),
                                        check_text, note]) + " |")
    return "\n".join(lines)


def environment(plan: Plan) -> dict:
    import transformers
    import trl

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
           "python": platform.python_version(), "device": plan.device}
    if plan.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["threads"] = torch.get_num_threads()
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: the same code paths, no GPU numbers")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the accelerator's dense bf16 peak")
    p.add_argument("--budget-s", type=float, default=450.0, help="measurements that would end later are skipped")
    p.add_argument("--rmb", type=Path, default=REPO / "benchmarks" / "gpu" / "carry" / "rmb",
                   help="folder of RMB sample files")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "gpu" / "out" / "gpu_check.json")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (smoke)")
    args = p.parse_args(argv)
    budget = Budget(args.budget_s)
    if args.cpu_smoke:
        plan = Plan.smoke()
    elif torch.cuda.is_available():
        plan = Plan.gpu()
    else:
        print("error: no CUDA device; run with --cpu-smoke on a machine without one", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(0)
    from qwen_align.fsutil import atomic_write_json

    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "environment": environment(plan),
              "peak_tflops": args.peak_tflops, "budget_s": args.budget_s, "elapsed_s": 0.0, "rows": []}

    def write(rows: list[dict]) -> None:
        atomic_write_json(args.json, {**report, "elapsed_s": budget.elapsed(), "rows": rows})

    rows = run(plan, budget, args.rmb, args.peak_tflops, on_row=write)
    write(rows)
    label = "CPU SMOKE (tiny shapes; not GPU numbers)" if args.cpu_smoke else f"GPU check on {report['environment'].get('gpu')}"
    print(f"\n{label}, {budget.elapsed():.0f} s, MFU against {args.peak_tflops:g} TFLOP/s\n")
    print(table(rows))
    print(f"\nwrote {args.json}")
    failed = [r for r in rows if r["status"] == "failed" or not all((r.get("checks") or {}).values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
