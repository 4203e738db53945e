"""The one model definition (presets, policy and reward from one loader and format), atomic writes, verifiers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2ForSequenceClassification

from qwen_align.errors import DataError, UserError
from qwen_align.fsutil import atomic_dir, atomic_write_json
from qwen_align.model import load_model, preset_config, save_checkpoint
from qwen_align.presets import PRESETS, preset_name
from qwen_align.verifiers import verify


@pytest.mark.parametrize(
    "name, hidden, layers, heads, kv, inter, tied, vocab",
    [
        ("0.5b", 896, 24, 14, 2, 4864, True, 151936),
        ("1.5b", 1536, 28, 12, 2, 8960, True, 151936),
        ("3b", 2048, 36, 16, 2, 11008, True, 151936),
        ("7b", 3584, 28, 28, 4, 18944, False, 152064),
        ("14b", 5120, 48, 40, 8, 13824, False, 152064),
        ("32b", 5120, 64, 40, 8, 27648, False, 152064),
        ("72b", 8192, 80, 64, 8, 29568, False, 152064),
    ],
)
def test_published_shapes(name, hidden, layers, heads, kv, inter, tied, vocab):
    c = preset_config(name)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (hidden, layers, heads, kv)
    assert (c.intermediate_size, c.tie_word_embeddings, c.vocab_size) == (inter, tied, vocab)
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rms_norm_eps == 1e-6 and c.hidden_act == "silu"


def test_preset_names():
    assert preset_name("Qwen2.5-7B") == "7b" and preset_name("tiny") == "tiny" and preset_name("./ckpt") is None
    assert set(PRESETS) >= {"0.5b", "72b", "tiny"}


def test_tiny_is_a_qwen2_with_qkv_bias_and_gqa(demo_tokenizer):
    model = load_model("tiny", tokenizer=demo_tokenizer)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.o_proj.bias is None
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.vocab_size == len(demo_tokenizer)


def test_policy_and_reward_share_loader_and_format(tmp_path, demo_tokenizer):
    policy = load_model("tiny", tokenizer=demo_tokenizer, seed=1)
    save_checkpoint(policy, demo_tokenizer, tmp_path / "ckpt")
    assert not list(tmp_path.glob(".ckpt.*"))  # no temporary left behind
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(again(ids).logits, policy(ids).logits)
    reward = load_model(tmp_path / "ckpt", "reward", tokenizer=demo_tokenizer)
    assert isinstance(reward, Qwen2ForSequenceClassification) and reward.config.num_labels == 1
    assert reward(ids).logits.shape == (1, 1)
    torch.testing.assert_close(reward.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    save_checkpoint(reward, demo_tokenizer, tmp_path / "rm")
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").config.num_labels == 1


def test_unknown_model_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a preset .* nor a checkpoint directory"):
        load_model(tmp_path / "nothing")


def test_atomic_dir_keeps_the_old_version_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "f").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "f").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "f").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(target) as d:
        (d / "f").write_text("v2")
    assert (target / "f").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_json(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    atomic_write_json(tmp_path / "m.json", {"a": 2})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2} and len(list(tmp_path.iterdir())) == 1


def test_exact_and_regex_verifiers():
    assert verify({"verifier": "exact", "answer": "85"}, " 85\n").passed
    assert verify({"verifier": "exact", "answer": "85"}, "85.0").passed
    assert not verify({"verifier": "exact", "answer": "85"}, "86").passed
    assert not verify({"verifier": "exact", "answer": "85"}, "85 apples").passed
    assert verify({"verifier": "regex", "pattern": r"\d+ apples"}, "85 apples").passed
    assert verify({"verifier": "exact", "answer": "85"}, "85").score == 1.0
    with pytest.raises(DataError, match="unknown verifier 'magic'"):
        verify({"verifier": "magic"}, "x")
    with pytest.raises(DataError, match="needs the field 'answer'"):
        verify({"verifier": "exact"}, "x")
