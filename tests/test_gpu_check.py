"""benchmarks/gpu/check.py --cpu-smoke: every measurement of the GPU check runs its code path at tiny shapes on
CPU, gives finite numbers and passes its correctness checks; what needs CUDA is marked skipped, not faked."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def rmb_sample(folder: Path) -> Path:
    """One pairwise and one best-of-N item in the RMB release format."""
    folder.mkdir()
    conv = [{"role": "user", "content": "Help me", "language": "English"}]
    (folder / "Pairwise_set__Helpfulness__Chat__Discussion.json").write_text(json.dumps([{
        "pair_uid": "1", "conversation_input": conv, "chosen": {"llm_name": "x", "answer": "Sure."},
        "reject": {"llm_name": "y", "answer": "No."}, "category_path": "Pairwise_set/Helpfulness/Chat/Discussion"}]))
    (folder / "BoN_set__Harmlessness__S1.json").write_text(json.dumps([{
        "bon_uid": "b1", "conversation_input": conv, "bon_best": {"llm_name": "x", "answer": "I can't."},
        "loser_list": [{"llm_name": "y", "answer": "Here is how."}], "category_path": "BoN_set/Harmlessness/S1"}]))
    return folder


def numbers(row: dict):
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def test_cpu_smoke_runs_every_measurement(tmp_path, capsys):
    check = load_check()
    out = tmp_path / "smoke.json"
    assert check.main(["--cpu-smoke", "--json", str(out), "--rmb", str(rmb_sample(tmp_path / "rmb"))]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke"
    rows = {(r["section"], r["case"]): r for r in report["rows"]}
    plan = check.Plan.smoke()
    expected = {("sft", f"{p} {n} {loss}") for p in plan.sft_presets for n in plan.sft_lengths for loss in plan.sft_losses}
    expected |= {("grpo", "tiny 2 steps"), ("rejection_sampling", "tiny 16x4"), ("eval_rm", "tiny RMB samples"),
                 ("packing", "tiny padded sdpa"), ("packing", "tiny packed sdpa"),
                 ("packing", "tiny packed flex_attention")}
    assert set(rows) == expected
    for key, row in rows.items():
        if key[1].endswith("liger"):
            assert row["status"] == "skipped" and "needs CUDA" in row["note"]
            continue
        if key == ("packing", "tiny packed flex_attention"):
            assert row["status"] == "skipped" and "CPU" in row["note"]
            continue
        assert row["status"] == "ok", row
        assert row["checks"] and all(row["checks"].values()), row
        for name, value in numbers(row):
            assert math.isfinite(value), (key, name, value)
    sft = rows[("sft", "tiny 32 ours")]
    assert sft["tokens_per_s"] > 0 and 0 < sft["mfu"] < 1 and sft["checks"]["checkpoint_loads"]
    assert set(rows[("sft", "tiny 64 trl")]["checks"]) == {"bf16_loss_vs_fp32", "grads_finite"}
    grpo = rows[("grpo", "tiny 2 steps")]
    assert grpo["generation_s"] > 0 and grpo["samples_per_s"] > 0
    assert rows[("eval_rm", "tiny RMB samples")]["items_per_s"] > 0
    printed = capsys.readouterr().out
    assert "CPU SMOKE" in printed and "| sft | tiny 32 ours | ok |" in printed


def test_flops_formula_counts_matmuls_and_causal_attention():
    check = load_check()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    # Per layer: q 16x16, k and v 16x8 each, o 16x16, gate/up/down 16x32 each; the LM head 100x16 (tied, still a matmul).
    per_layer = 16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 32
    n = 2 * per_layer + 100 * 16
    assert check.matmul_weights(model) == n
    assert check.train_flops(model, [10, 30]) == 6 * n * 40 + 6 * 2 * 16 * (10 * 10 + 30 * 30)


def test_gpu_plan_covers_the_issue_and_runs_32k_last(tmp_path):
    check = load_check()
    plan = check.Plan.gpu()
    steps = check.measurements(plan, tok=None, work=tmp_path, rmb=None)
    cases = [(section, case) for section, case, _, _ in steps]
    sft = [c for s, c in cases if s == "sft"]
    assert sorted(sft) == sorted(f"{p} {n} {loss}" for p in ("0.5b", "1.5b") for n in (8192, 32768)
                                 for loss in ("ours", "liger", "trl"))
    assert [s for s, _ in cases if s != "sft"] == ["grpo", "rejection_sampling", "eval_rm", "packing"]
    assert all("32768" in c for _, c in cases[-6:])  # what a tight budget skips is the longest
    assert ("grpo", "0.5b 20 steps") in cases and ("rejection_sampling", "0.5b 256x8") in cases
    assert all(key in plan.estimates for _, _, key, _ in steps)
    budget = check.Budget(10.0)
    assert budget.fits(5.0) and not budget.fits(11.0)
