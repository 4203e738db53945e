"""LoRA in every training stage through the runner: only adapters (and the reward model's score head) train,
the output is merged weights or an adapter folder a later stage starts from, DPO and GRPO keep no second
model for the reference, and QLoRA is refused in one line where it cannot run."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml
from helpers import write_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

import dpo.stage
import grpo.stage
import reward_model.stage
import sft.stage
from qwen_align.errors import UserError
from qwen_align.lora import check_runnable
from qwen_align.model import load_model, save_checkpoint
from qwen_align.recipe import LoraOptions, load_recipe
from qwen_align.rm_eval.scorer import load_reward_model
from qwen_align.runner import run_recipe

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.fixture
def trained(monkeypatch):
    """What each stage hands to save_trained_model: the trainer and its model's parameters (value, trainable)."""
    seen: dict = {}
    for module in (sft.stage, dpo.stage, reward_model.stage, grpo.stage):
        original = module.save_trained_model

        def recording(trainer, tokenizer, context, lora=None, _original=original):
            model = trainer.accelerator.unwrap_model(trainer.model)
            seen["trainer"] = trainer
            seen["params"] = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
            return _original(trainer, tokenizer, context, lora)

        monkeypatch.setattr(module, "save_trained_model", recording)
    return seen


@pytest.fixture
def built(monkeypatch):
    """Names of the model classes constructed (from scratch or from_pretrained) while the fixture is active."""
    names: list[str] = []
    original = PreTrainedModel.__init__

    def counting(self, *args, **kwargs):
        names.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "__init__", counting)
    return names


def plain_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")


def assert_only_adapters_trained(params: dict, start: dict[str, torch.Tensor], trainable_extra: str = "lora_"):
    trainable = [n for n, (_, grad) in params.items() if grad]
    assert trainable and all("lora_" in n or trainable_extra in n for n in trainable), trainable
    for name, (value, grad) in params.items():
        if not grad:
            assert torch.equal(value, start[plain_name(name)]), f"frozen {name} changed"
    # lora_B starts at zero: a trained adapter has moved it.
    assert any("lora_B" in n and value.abs().sum() > 0 for n, (value, _) in params.items())


def _write(path, raw):
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {10 + i}+{20 + 3 * i}?"}],
             "chosen": [{"role": "assistant", "content": str(30 + 4 * i)}],
             "rejected": [{"role": "assistant", "content": str(31 + 4 * i + i % 3)}]} for i in range(n)]


def test_sft_adapter_output_starts_a_lora_dpo_stage_without_a_reference_copy(
        small_sft_recipe, tmp_path, demo_tokenizer, trained, built):
    path, raw = small_sft_recipe
    sft_stage = raw["stages"][0]
    sft_stage.update(lora={**LORA, "save": "adapter"}, task_eval=None)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    raw["stages"].append({
        "name": "dpo", "kind": "dpo", "init_from": "sft", "data": {"sources": [{"path": str(pairs)}]},
        "optimizer": "adamw", "lora": LORA, "eval_fraction": 0.25, "max_length": 64,
        "per_device_train_batch_size": 3, "max_steps": 2, "save_steps": 10, "logging_steps": 1,
        "learning_rate": 1e-2, "dtype": "float32",
    })
    _write(path, raw)

    # SFT from the preset: only adapters train, and the output is an adapter folder on the preset.
    sft_entry = run_recipe(load_recipe(path), until="sft")["stages"]["sft"]
    assert sft_entry["status"] == "completed", sft_entry.get("error")
    start = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0)
    assert_only_adapters_trained(trained["params"], dict(start.named_parameters()))
    out = tmp_path / "run" / "sft" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "config.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    adapted = PeftModel.from_pretrained(load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0), str(out))
    merged_by_peft = dict(adapted.merge_and_unload().named_parameters())
    # The model loader reads the folder back as base + adapter, merged: what a later stage starts from.
    sft_weights = dict(load_model(out, "policy").named_parameters())
    assert merged_by_peft.keys() == sft_weights.keys()
    assert all(torch.equal(merged_by_peft[n], sft_weights[n]) for n in sft_weights)
    assert any(not torch.equal(sft_weights[n], p) for n, p in start.named_parameters())

    # DPO from that folder: one model (the policy); the reference is the policy with its adapter off.
    built.clear()
    entry = run_recipe(load_recipe(path), only=["dpo"])["stages"]["dpo"]
    assert entry["status"] == "completed", entry.get("error")
    assert trained["trainer"].ref_model is None
    assert built.count("Qwen2ForCausalLM") == 1, built
    assert_only_adapters_trained(trained["params"], sft_weights)
    # Held-out pairs are scored with the adapter on after training: the implicit reward has moved off zero.
    assert entry["metrics"]["heldout_pairs"]["before"]["reward_margin"] == 0
    assert entry["metrics"]["heldout_pairs"]["after"]["reward_margin"] != 0
    dpo_out = AutoModelForCausalLM.from_pretrained(entry["output"])
    assert not any("lora" in n for n, _ in dpo_out.named_parameters())
    assert any(not torch.equal(p, sft_weights[n]) for n, p in dpo_out.named_parameters())


def test_reward_model_lora_trains_the_score_head_into_the_adapter_output(tmp_path, demo_tokenizer_dir, demo_tokenizer,
                                                                        trained):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [{"name": "rm", "kind": "reward_model", "data": {"sources": [{"path": str(pairs)}]},
                       "lora": {**LORA, "save": "adapter"}, "max_length": 64, "per_device_train_batch_size": 8,
                       "max_steps": 2, "learning_rate": 1e-2, "eval_fraction": 0.25, "logging_steps": 1,
                       "save_steps": 10, "dtype": "float32"}]}
    entry = run_recipe(load_recipe(_write(tmp_path / "recipe.yaml", raw)))["stages"]["rm"]
    assert entry["status"] == "completed", entry.get("error")
    start = dict(load_model("tiny", "reward", tokenizer=demo_tokenizer, seed=0).named_parameters())
    params = trained["params"]
    assert_only_adapters_trained(params, start, trainable_extra="score.modules_to_save")
    trained_score = params["base_model.model.score.modules_to_save.default.weight"][0]
    assert not torch.equal(trained_score, start["score.weight"])
    # The adapter folder carries the head: peft, the model loader and `qwen-align eval-rm` all read it back.
    out = entry["output"]
    by_peft = PeftModel.from_pretrained(load_model("tiny", "reward", tokenizer=demo_tokenizer, seed=0), out)
    assert torch.equal(by_peft.merge_and_unload().score.weight, trained_score)
    model, _, _ = load_reward_model(out, dtype="float32")
    assert torch.equal(model.score.weight, trained_score)
    with pytest.raises(UserError, match="reward-model adapter .* cannot start a policy"):
        load_model(out, "policy")


def test_likelihood_reward_model_lora_merges_into_a_marked_causal_lm(tmp_path, demo_tokenizer_dir, demo_tokenizer,
                                                                      trained):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [{"name": "rm", "kind": "reward_model", "score": "likelihood", "data": {"sources": [{"path": str(pairs)}]},
                       "lora": LORA, "max_length": 64, "per_device_train_batch_size": 8, "max_steps": 2,
                       "learning_rate": 1e-2, "eval_fraction": 0.25, "logging_steps": 1, "save_steps": 10,
                       "dtype": "float32"}]}
    entry = run_recipe(load_recipe(_write(tmp_path / "recipe.yaml", raw)))["stages"]["rm"]
    assert entry["status"] == "completed", entry.get("error")
    start = dict(load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0).named_parameters())
    assert_only_adapters_trained(trained["params"], start)  # a causal LM: no score head to train
    model, _, _ = load_reward_model(entry["output"], dtype="float32")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.reward_score["kind"] == "likelihood"
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())  # the adapter is merged in


def test_qlora_merge_on_the_plain_base_keeps_the_likelihood_mark(demo_tokenizer):
    """QLoRA's output is merged into the base reloaded unquantized; that reload must stay a likelihood RM.
    (The merge itself does not need a quantized model, so this runs on CPU without bitsandbytes.)"""
    from peft import LoraConfig, get_peft_model

    from qwen_align.lora import _merged_on_plain_base
    from qwen_align.reward_score import likelihood_spec, mark_likelihood

    model = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0)
    mark_likelihood(model, 2.5)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    merged = _merged_on_plain_base(peft_model, demo_tokenizer, "tiny", 0)
    assert likelihood_spec(merged.config) == {"kind": "likelihood", "beta": 2.5}


def test_grpo_lora_with_kl_uses_the_adapter_free_policy_as_reference(tmp_path, demo_tokenizer_dir, demo_tokenizer,
                                                                      trained, built):
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"}], "verifier": "exact",
             "answer": str(2 * i)} for i in range(8)]
    write_jsonl(tmp_path / "q.jsonl", rows)
    # A (random) reward model scores every completion differently: advantages, and so gradients, are not zero.
    rm = save_checkpoint(load_model("tiny", "reward", tokenizer=demo_tokenizer, seed=1), demo_tokenizer, tmp_path / "rm")
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [{"name": "grpo", "kind": "grpo", "data": {"sources": [{"path": "q.jsonl"}]},
                       "rewards": [{"kind": "reward_model", "source": str(rm)}], "lora": LORA, "beta": 0.04, "order_by_reward_variance": False,
                       "num_generations": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                       "max_steps": 2, "max_completion_length": 3, "learning_rate": 1e-2, "logging_steps": 1,
                       "dtype": "float32"}]}
    entry = run_recipe(load_recipe(_write(tmp_path / "recipe.yaml", raw)))["stages"]["grpo"]
    assert entry["status"] == "completed", entry.get("error")
    assert trained["trainer"].ref_model is None and built.count("Qwen2ForCausalLM") == 1, built
    start = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0)
    assert_only_adapters_trained(trained["params"], dict(start.named_parameters()))
    # The KL term is measured against the adapter-free policy: zero at the first step, positive once it moved.
    kl = [r["kl"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "kl" in r]
    assert len(kl) == 2 and kl[0] == pytest.approx(0, abs=1e-6) and kl[1] > 0
    output = AutoModelForCausalLM.from_pretrained(entry["output"])
    assert any(not torch.equal(p, start.state_dict()[n]) for n, p in output.named_parameters())


def test_qlora_without_bitsandbytes_and_gpu_is_one_line_before_any_work(small_sft_recipe, tmp_path):
    path, raw = small_sft_recipe
    write_jsonl(tmp_path / "sft.jsonl", [{"not": "a conversation"}])  # reading data would fail differently
    raw["stages"][0]["lora"] = {**LORA, "quantize": "4bit"}
    _write(path, raw)
    with pytest.raises(UserError, match=r"^stage 'sft': lora\.quantize: 4-bit QLoRA needs bitsandbytes on a CUDA "
                                        r"GPU; .*(not installed|no CUDA GPU)[^\n]*$"):
        run_recipe(load_recipe(path))
    assert not (tmp_path / "run" / "sft" / "final").exists()
    with pytest.raises(UserError, match="8-bit QLoRA"):
        check_runnable(LoraOptions(quantize="8bit"), "dpo")
    check_runnable(LoraOptions(), "dpo")  # plain LoRA runs anywhere


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_qlora_trains_on_bitsandbytes_cpu_backend(small_sft_recipe, demo_tokenizer, monkeypatch, trained, save):
    """Where bitsandbytes is installed, its CPU backend runs the QLoRA path that the stage gate keeps for GPUs."""
    monkeypatch.setattr("qwen_align.lora.check_runnable", lambda *args: None)
    path, raw = small_sft_recipe
    raw["stages"][0].update(lora={**LORA, "quantize": "4bit", "save": save}, task_eval=None)
    entry = run_recipe(load_recipe(_write(path, raw)))["stages"]["sft"]
    assert entry["status"] == "completed", entry.get("error")
    assert any("Linear4bit" in type(m).__name__ for m in trained["trainer"].model.modules())
    assert all("lora_" in n for n, (_, grad) in trained["params"].items() if grad)
    assert any("lora_B" in n and value.abs().sum() > 0 for n, (value, _) in trained["params"].items())
    start = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0).state_dict()
    if save == "merged":  # merged into the base reloaded in bf16: compare with the start rounded the same way
        start = {n: t.to(torch.bfloat16).float() for n, t in start.items()}
    output = load_model(entry["output"], "policy")  # merged weights, or base + adapter merged
    moved = max((p - start[n]).abs().max().item() for n, p in output.state_dict().items() if "q_proj.weight" in n)
    assert moved > 1e-5, moved


def test_adapter_on_an_adapter_folder_loads_both_on_the_seeded_preset(tmp_path, demo_tokenizer):
    from peft import get_peft_model

    from qwen_align.lora import peft_config, save_adapter

    options = LoraOptions(**LORA, target_modules=["q_proj", "v_proj"], save="adapter")

    def adapted(base_model):
        model = get_peft_model(base_model, peft_config(options, "causal_lm"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a trained-looking adapter (B starts at zero)
        return model

    first = adapted(load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=3))
    save_adapter(first, demo_tokenizer, tmp_path / "a1", base="tiny", seed=3)
    expected = first.merge_and_unload()
    second = adapted(load_model(tmp_path / "a1", "policy"))
    save_adapter(second, demo_tokenizer, tmp_path / "a2", base=str(tmp_path / "a1"), seed=0)
    expected_second = dict(second.merge_and_unload().named_parameters())

    # The preset base is rebuilt with the seed the first folder recorded, not the loader's default.
    assert all(torch.equal(p, dict(expected.named_parameters())[n])
               for n, p in load_model(tmp_path / "a1", "policy").named_parameters())
    loaded = dict(load_model(tmp_path / "a2", "policy").named_parameters())
    assert all(torch.equal(loaded[n], expected_second[n]) for n in expected_second)

    (tmp_path / "a1").rename(tmp_path / "moved")
    with pytest.raises(UserError, match=r"a2': its base model '.*a1' \(qwen_align_base.json\) is not a preset nor"):
        load_model(tmp_path / "a2", "policy")
