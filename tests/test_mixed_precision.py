"""bf16 = bf16 compute over fp32 master weights: updates below bf16's spacing still add up (on CPU too)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import arithmetic_rows, write_jsonl
from safetensors import safe_open

from qwen_align.errors import RecipeError
from qwen_align.losses import causal_lm_loss
from qwen_align.model import load_model, save_checkpoint
from qwen_align.recipe import load_recipe
from qwen_align.runner import run_recipe

# Adam's first steps move every weight by about the learning rate; 1e-5 is below half of bf16's spacing
# (2**-13 = 1.2e-4 for weights in [2**-6, 2**-5)) for every weight of magnitude >= 0.005.
LR = 1e-5
STEPS = 4
LARGE = 0.01  # weights this large cannot move by LR in bf16 (half spacing >= 3e-5)


def _sft_recipe(tmp_path, tokenizer_dir, name: str, model: str = "tiny", **options) -> tuple:
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(32))
    raw = {
        "model": model, "tokenizer": str(tokenizer_dir), "run_dir": str(tmp_path / name), "seed": 0,
        "stages": [{
            "name": "sft", "kind": "sft", "data": {"sources": [{"path": str(data)}]}, "max_length": 48,
            "packing": False, "per_device_train_batch_size": 8, "max_steps": STEPS, "learning_rate": LR,
            "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "save_steps": 100, "logging_steps": 1,
            **options,
        }],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path, raw


def _trained(path) -> dict[str, torch.Tensor]:
    output = run_recipe(load_recipe(path))["stages"]["sft"]["output"]
    with safe_open(f"{output}/model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _losses(path) -> list[float]:
    run_dir = yaml.safe_load(path.read_text())["run_dir"]
    records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return [r["loss"] for r in records if "loss" in r]


def _displacement(trained: dict, init: dict) -> tuple[torch.Tensor, float]:
    """Per-element movement of the large 2-D weights, and the share of them that moved at all."""
    moved = []
    for name, w0 in init.items():
        if w0.dim() == 2 and name in trained:
            large = w0.abs() >= LARGE
            moved.append((trained[name].float() - w0.float())[large])
    moved = torch.cat(moved)
    return moved, float((moved != 0).float().mean())


def test_bf16_updates_below_spacing_move_weights_as_fp32_does(tmp_path, demo_tokenizer_dir, demo_tokenizer):
    init = {k: v.clone() for k, v in load_model("tiny", tokenizer=demo_tokenizer, seed=0).state_dict().items()}
    runs, losses = {}, {}
    for name, options in {
        "fp32": {"dtype": "float32"},
        "bf16": {"dtype": "bfloat16", "save_dtype": "float32"},  # keep the master weights to measure them
        "pure": {"dtype": "bfloat16", "pure_bf16": True, "save_dtype": "float32"},
    }.items():
        path = _sft_recipe(tmp_path, demo_tokenizer_dir, name, **options)[0]
        runs[name], losses[name] = _trained(path), _losses(path)

    # The bf16 run did compute in bf16 (the fused loss under autocast), within bf16's rounding of fp32.
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)

    fp32, fp32_moved = _displacement(runs["fp32"], init)
    bf16, bf16_moved = _displacement(runs["bf16"], init)
    pure_init = {k: v.to(torch.bfloat16) for k, v in init.items()}  # pure bf16 starts from the rounded weights
    _, pure_moved = _displacement(runs["pure"], pure_init)

    assert fp32_moved > 0.95 and bf16_moved > 0.95
    # As far as fp32, and the same way: bf16 compute changes the gradients a little, Adam's step size not at all.
    ratio = bf16.norm() / fp32.norm()
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=0)
    assert 0.9 < ratio < 1.1, ratio
    assert cosine > 0.9, cosine
    assert fp32.abs().mean() == pytest.approx(LR * STEPS, rel=0.3)
    # Without master weights every one of these updates rounds away.
    assert pure_moved < 0.01, pure_moved


def test_output_checkpoint_in_the_input_dtype(tmp_path, demo_tokenizer_dir, demo_tokenizer):
    start = tmp_path / "bf16-start"
    save_checkpoint(load_model("tiny", tokenizer=demo_tokenizer, seed=0, dtype="bfloat16"), demo_tokenizer, start)
    path, _ = _sft_recipe(tmp_path, demo_tokenizer_dir, "from-bf16", model=str(start), dtype="bfloat16")
    output = run_recipe(load_recipe(path))["stages"]["sft"]["output"]
    config = json.loads(open(f"{output}/config.json").read())
    assert config["dtype"] == "bfloat16"
    with safe_open(f"{output}/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    trained = load_model(output, dtype="auto")
    assert trained.dtype == torch.bfloat16


def test_fused_loss_under_cpu_autocast_keeps_fp32_head_gradients(demo_tokenizer):
    model = load_model("tiny", tokenizer=demo_tokenizer, seed=0)
    ids = torch.randint(0, len(demo_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss(model, inputs)
        reference = model(**inputs).loss
    loss.backward()
    head = model.get_output_embeddings().weight
    assert head.dtype == torch.float32 and head.grad.dtype == torch.float32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    # The fused loss runs the head in fp32, the model's own path in bf16: equal within bf16's rounding.
    assert loss.item() == pytest.approx(reference.item(), rel=1e-2)


def test_pure_bf16_needs_bf16(tmp_path, demo_tokenizer_dir):
    path, _ = _sft_recipe(tmp_path, demo_tokenizer_dir, "bad", dtype="float32", pure_bf16=True)
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: stages\[0\].*pure_bf16.*dtype: bfloat16"):
        load_recipe(path)
