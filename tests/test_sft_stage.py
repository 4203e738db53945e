"""SFT stage and runner: a real (tiny) training run, manifest, skip, resume, clear failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import arithmetic_rows, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qwen_align.errors import DataError, RecipeError
from qwen_align.generation import SamplingParams, generate
from qwen_align.recipe import load_recipe
from qwen_align.runner import run_recipe
from qwen_align.tokenizer import load_tokenizer
from qwen_align.verifiers import verify
from sft.dataset import tokenize_conversations


def _manifest(raw) -> dict:
    with open(f"{raw['run_dir']}/manifest.json") as f:
        return json.load(f)


def test_length_report_truncates_or_drops(demo_tokenizer):
    rows = arithmetic_rows(4)
    long_row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "1"}]}
    ds, report = tokenize_conversations([*rows, long_row], demo_tokenizer, max_length=64, on_long="truncate")
    # Truncation cut the answer off the long row, leaving nothing to learn: dropped and counted.
    assert (report.truncated, report.dropped_no_target, report.examples_out) == (1, 1, 4)
    assert max(len(x) for x in ds["input_ids"]) <= 64 and report.longest > 64
    ds, report = tokenize_conversations([*rows, long_row], demo_tokenizer, max_length=64, on_long="drop")
    assert (report.dropped_for_length, report.truncated, report.examples_out) == (1, 0, 4)
    mask = ds[0]["assistant_masks"]
    answer = [t for t, m in zip(ds[0]["input_ids"], mask) if m]
    assert demo_tokenizer.decode(answer) == rows[0]["messages"][1]["content"] + "<|im_end|>"


def test_run_skip_and_rerun_on_change(small_sft_recipe, capsys):
    path, raw = small_sft_recipe
    manifest = run_recipe(load_recipe(path))
    entry = manifest["stages"]["sft"]
    assert entry["status"] == "completed" and entry["metrics"]["train_steps"] == 2
    assert entry["versions"]["transformers"] and entry["config_hash"]
    assert _manifest(raw)["stages"]["sft"]["status"] == "completed"
    model = AutoModelForCausalLM.from_pretrained(entry["output"])
    assert model.config.model_type == "qwen2"
    # The recorded accuracy is the saved model's: its greedy answers to the held-out prompts, verified here.
    heldout = [json.loads(line) for line in open(raw["stages"][0]["task_eval"]["path"])]
    answers = generate(model, load_tokenizer(entry["output"]), [r["messages"] for r in heldout],
                       SamplingParams(max_new_tokens=raw["stages"][0]["task_eval"]["max_new_tokens"]))
    passed = [verify(r, a[0]).passed for r, a in zip(heldout, answers)]
    assert entry["metrics"]["heldout_accuracy"] == sum(passed) / len(passed)
    assert entry["metrics"]["heldout"]["num_examples"] == len(heldout)
    records = [json.loads(line) for line in open(f"{raw['run_dir']}/metrics.jsonl")]
    assert any(r.get("stage") == "sft" and "loss" in r for r in records)
    assert (path.parent / "run" / "logs" / "sft.log").exists()

    capsys.readouterr()
    run_recipe(load_recipe(path))
    assert "skipping" in capsys.readouterr().out

    before = AutoModelForCausalLM.from_pretrained(entry["output"]).state_dict()
    changed = run_recipe(load_recipe(path, ["stages.sft.learning_rate=5e-4"]))
    assert changed["stages"]["sft"]["config_hash"] != entry["config_hash"]
    assert "skipping" not in capsys.readouterr().out
    after = AutoModelForCausalLM.from_pretrained(changed["stages"]["sft"]["output"]).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained again, with the new rate


def test_interrupted_stage_resumes_from_last_checkpoint_to_the_uninterrupted_weights(small_sft_recipe):
    path, raw = small_sft_recipe
    overrides = ["stages.sft.max_steps=4", "stages.sft.save_steps=2", "stages.sft.task_eval=null"]
    entry = run_recipe(load_recipe(path, overrides))["stages"]["sft"]
    uninterrupted = load_file(f"{entry['output']}/model.safetensors")
    # As if the process died during step 3 or 4: only checkpoint-2 was written, no output, status running.
    stage_dir = path.parent / "run" / "sft"
    shutil.rmtree(stage_dir / "checkpoints" / "checkpoint-4")
    shutil.rmtree(stage_dir / "final")
    manifest_path = path.parent / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"]["sft"]["status"] = "running"
    manifest_path.write_text(json.dumps(manifest))

    again = run_recipe(load_recipe(path, overrides))["stages"]["sft"]
    assert again["status"] == "completed" and again["resumed_from"].endswith("checkpoint-2")
    steps = [r["step"] for r in map(json.loads, open(path.parent / "run" / "metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 3, 4]  # steps 3 and 4 trained again, 1 and 2 not
    resumed = load_file(f"{again['output']}/model.safetensors")
    # Optimizer moments, scheduler, RNG and the data order all restored: the same weights, bit for bit.
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_bad_data_fails_clearly_and_writes_no_output(small_sft_recipe):
    path, raw = small_sft_recipe
    data = raw["stages"][0]["data"]["sources"][0]["path"]
    with open(data, "a") as f:
        f.write('{"messages": [}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:49: invalid JSON"):
        run_recipe(load_recipe(path))
    assert _manifest(raw)["stages"]["sft"]["status"] == "failed"
    assert not (path.parent / "run" / "sft" / "final").exists()


def test_cli_one_line_for_bad_data_and_missing_upstream(small_sft_recipe):
    path, raw = small_sft_recipe
    raw["stages"].append({"name": "dpo", "kind": "dpo", "init_from": "sft", "data": {"sources": [{"stage": "sft"}]}})
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "qwen_align.cli", "run", str(path), "--only", "dpo"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "has not completed" in proc.stderr and "Traceback" not in proc.stderr

    with open(raw["stages"][0]["data"]["sources"][0]["path"], "a") as f:
        f.write("not json\n")
    proc = subprocess.run([sys.executable, "-m", "qwen_align.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "sft.jsonl:49" in proc.stderr


def test_a_failing_later_stage_keeps_the_earlier_one_and_records_the_error(small_sft_recipe, tmp_path):
    path, raw = small_sft_recipe
    missing = str(tmp_path / "no_pairs.jsonl")
    raw["stages"].append({"name": "dpo", "kind": "dpo", "init_from": "sft", "data": {"sources": [{"path": missing}]}})
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match="no_pairs.jsonl: data file not found"):
        run_recipe(load_recipe(path))
    stages = _manifest(raw)["stages"]
    assert stages["sft"]["status"] == "completed"
    assert stages["dpo"]["status"] == "failed" and "data file not found" in stages["dpo"]["error"]


def test_fused_loss_trains_like_trl_loss(small_sft_recipe):
    """One step with our fused loss and one with TRL's own: same loss and same updated weights."""
    path, raw = small_sft_recipe
    results = {}
    for fused in (True, False):
        recipe = load_recipe(path, [f"stages.sft.fused_loss={str(fused).lower()}", "stages.sft.max_steps=1",
                                    f"run_dir={raw['run_dir']}-{fused}"])
        entry = run_recipe(recipe)["stages"]["sft"]
        results[fused] = (entry["metrics"]["train_loss"], AutoModelForCausalLM.from_pretrained(entry["output"]))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-4)
    # Adam's first step moves each weight by about lr * sign(grad), so a gradient within float noise of zero
    # can flip sign between the two (equal up to summation order) losses: allow that for a few entries only.
    lr = raw["stages"][0]["learning_rate"]
    for (n, a), (_, b) in zip(results[True][1].named_parameters(), results[False][1].named_parameters()):
        off = ~torch.isclose(a, b, rtol=1e-4, atol=1e-5)
        assert off.float().mean() < 1e-3, n
        assert (a - b).abs().max() <= 2 * lr * 1.01, n


def test_lora_sft_saves_a_merged_plain_checkpoint(small_sft_recipe):
    path, raw = small_sft_recipe
    recipe = load_recipe(path, ["stages.sft.lora.r=4", "stages.sft.max_steps=1"])
    entry = run_recipe(recipe)["stages"]["sft"]
    model = AutoModelForCausalLM.from_pretrained(entry["output"])
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert entry["status"] == "completed"


def test_a_stage_refuses_an_upstream_stage_that_changed_since_it_ran(small_sft_recipe):
    path, raw = small_sft_recipe
    raw["stages"].append({"name": "dpo", "kind": "dpo", "init_from": "sft",
                          "data": {"sources": [{"path": raw["stages"][0]["data"]["sources"][0]["path"]}]}})
    path.write_text(yaml.safe_dump(raw))
    run_recipe(load_recipe(path), until="sft")
    changed = load_recipe(path, ["stages.sft.learning_rate=2e-3"])
    with pytest.raises(RecipeError, match="stage 'sft' is out of date .* run it first"):
        run_recipe(changed, only=["dpo"])


def test_held_out_accuracy_every_n_steps_and_stop_at(small_sft_recipe, tmp_path):
    """`every_steps` logs the held-out accuracy with its step, each the model's of that step (checked against a
    second run stopped there); `stop_at` ends training at the first evaluation that reaches it."""
    path, raw = small_sft_recipe
    stage = raw["stages"][0]
    stage.update(max_steps=4, task_eval={**stage["task_eval"], "every_steps": 1})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    entry = run_recipe(load_recipe(path))["stages"]["sft"]
    records = [json.loads(line) for line in open(f"{raw['run_dir']}/metrics.jsonl")]
    curve = {r["step"]: r["heldout_accuracy"] for r in records if "heldout_accuracy" in r and "step" in r}
    assert sorted(curve) == [1, 2, 3] and entry["metrics"]["train_steps"] == 4  # step 4 is the stage's own eval
    # The step-2 point is the accuracy of the model after 2 steps: the same recipe stopped at max_steps 2.
    two = run_recipe(load_recipe(path, [f"run_dir={tmp_path / 'two'}", "stages.sft.max_steps=2",
                                        "stages.sft.task_eval.every_steps=100"]))["stages"]["sft"]
    assert two["metrics"]["heldout_accuracy"] == curve[2]

    # A held-out set every answer passes: the first evaluation (step 1) reaches any target.
    anything = write_jsonl(tmp_path / "anything.jsonl", [{"messages": [{"role": "user", "content": "Hi"}],
                                                         "verifier": "regex", "pattern": "(?s).*"}] * 2)
    stopped = run_recipe(load_recipe(path, [f"run_dir={tmp_path / 'stop'}", f"stages.sft.task_eval.path={anything}",
                                            "stages.sft.task_eval.stop_at=0.5"]))["stages"]["sft"]
    assert stopped["status"] == "completed" and stopped["metrics"]["train_steps"] == 1
    assert stopped["metrics"]["heldout_accuracy"] == 1.0
    with pytest.raises(Exception, match="set every_steps too"):
        load_recipe(path, ["stages.sft.task_eval.every_steps=null", "stages.sft.task_eval.stop_at=0.5"])
