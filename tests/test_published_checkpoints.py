"""Checkpoints as Qwen publishes them: read as every stage's start, written by every stage so that
transformers and plain-Jinja engines load them; templates decided by rendering; masks by markers or prefix
renders; rope scaling and the context-length check."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import torch
import yaml
from helpers import arithmetic_rows, write_jsonl
from published import NO_PREFIX_TEMPLATE, QWEN25_BASE_TEMPLATE, QWEN25_INSTRUCT_TEMPLATE, write_published_checkpoint
from safetensors import safe_open
from test_tokenizer import MULTI_TURN, TOOL_CONVERSATION, WEATHER_TOOL
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from qwen_align import cli
from qwen_align.checkpoints import published
from qwen_align.errors import DataError, RecipeError, UserError
from qwen_align.recipe import load_recipe
from qwen_align.runner import run_recipe
from qwen_align.rm_eval.scorer import encode
from qwen_align.tokenizer import QWEN_CHAT_TEMPLATE
from sft.dataset import mask_mode, prefix_mask, tokenize_conversations

CONVERSATIONS = [(m, t) for m, t in published.PROBE_CONVERSATIONS] + [
    (MULTI_TURN, None), (TOOL_CONVERSATION, [WEATHER_TOOL]), (TOOL_CONVERSATION[:1], [WEATHER_TOOL]),
    ([{"role": "system", "content": "Ünïcode ✓ <b>&</b>"}, *MULTI_TURN], None),
]


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory, demo_tokenizer):
    return write_published_checkpoint(tmp_path_factory.mktemp("pub") / "instruct", demo_tokenizer)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, demo_tokenizer):
    return write_published_checkpoint(tmp_path_factory.mktemp("pub") / "base", demo_tokenizer, kind="base")


def _plain_render(template: str, messages, tools=None, add_generation_prompt=False) -> str:
    return jinja2.Environment().from_string(template).render(messages=messages, tools=tools,
                                                              add_generation_prompt=add_generation_prompt)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_portable_checkpoint(out: Path, input_template: str, tokenizer, model_cls=AutoModelForCausalLM):
    """What any stage output must be: plain-Jinja template as it came in, the published tokenizer files, an
    index that matches its shards, generation stop ids from the tokenizer, loadable by transformers."""
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names
    assert "chat_template.jinja" not in names
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    template = tokenizer_config["chat_template"]
    assert template == input_template
    assert "<|im_start|>" in tokenizer_config["additional_special_tokens"]  # the published name
    assert not isinstance(tokenizer_config.get("extra_special_tokens", {}), list)  # transformers 4 wants a dict
    for messages, tools in CONVERSATIONS[:4]:
        assert _plain_render(template, messages, tools) == _plain_render(input_template, messages, tools)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = {p.name for p in out.glob("*.safetensors")}
    assert set(index["weight_map"].values()) == shards
    weights = _weights(out)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab == json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.encode("What is 12+13?") == tokenizer.encode("What is 12+13?")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 1_000_000.0 and config["torch_dtype"] in ("float32", "bfloat16")
    AutoConfig.from_pretrained(out)
    model = model_cls.from_pretrained(out)
    assert set(model.state_dict()) >= set(weights)
    if model_cls is AutoModelForCausalLM:
        gen = json.loads((out / "generation_config.json").read_text())
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        assert gen["eos_token_id"] == ids
    return config


# --- templates ---------------------------------------------------------------------------------


def test_published_instruct_template_renders_as_ours_and_is_detected(demo_tokenizer):
    for messages, tools in CONVERSATIONS:
        for prompt in (False, True):
            ours = demo_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=prompt, chat_template=QWEN_CHAT_TEMPLATE)
            theirs = demo_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                        add_generation_prompt=prompt, chat_template=QWEN25_INSTRUCT_TEMPLATE)
            assert theirs == ours
    assert published.renders_like_qwen(demo_tokenizer, QWEN25_INSTRUCT_TEMPLATE)
    assert not published.renders_like_qwen(demo_tokenizer, QWEN25_BASE_TEMPLATE)  # another default system prompt
    assert not published.renders_like_qwen(demo_tokenizer, NO_PREFIX_TEMPLATE)
    assert not published.renders_like_qwen(demo_tokenizer, "{{ raise_exception('no') }}")


def test_our_plain_template_runs_in_plain_jinja2(demo_tokenizer):
    plain = published.qwen_plain_template()
    with pytest.raises(jinja2.TemplateSyntaxError):
        jinja2.Environment().from_string(QWEN_CHAT_TEMPLATE)
    for messages, tools in CONVERSATIONS[:5]:
        assert _plain_render(plain, messages) == demo_tokenizer.apply_chat_template(messages, tokenize=False)


def test_loading_picks_training_and_published_templates(instruct_dir, base_dir, tmp_path):
    tok = published.load_tokenizer(instruct_dir)
    assert tok.chat_template == QWEN_CHAT_TEMPLATE and tok.published_chat_template == QWEN25_INSTRUCT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and mask_mode(tok) == "markers"
    base = published.load_tokenizer(base_dir)
    assert base.chat_template == QWEN25_BASE_TEMPLATE and base.eos_token == "<|endoftext|>"
    assert mask_mode(base) == "prefix"
    with pytest.raises(UserError, match="assistant_mask: markers"):
        mask_mode(base, "markers")
    forced = published.load_tokenizer(base_dir, "qwen2.5")
    assert forced.chat_template == QWEN_CHAT_TEMPLATE and forced.published_chat_template == published.qwen_plain_template()
    jinja = tmp_path / "t.jinja"
    jinja.write_text(NO_PREFIX_TEMPLATE)
    assert published.load_tokenizer(instruct_dir, str(jinja)).chat_template == NO_PREFIX_TEMPLATE


# --- masks ---------------------------------------------------------------------------------------


def test_prefix_masks_match_marker_masks_where_renders_agree(base_dir, demo_tokenizer):
    base = published.load_tokenizer(base_dir)
    for messages, tools in [(CONVERSATIONS[1][0], None), ([{"role": "system", "content": "S"}, *MULTI_TURN], None),
                            ([{"role": "system", "content": "S"}, *TOOL_CONVERSATION], [WEATHER_TOOL])]:
        ids, mask = prefix_mask(base, messages, tools)
        ref = demo_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        assert ids == list(ref["input_ids"]) and mask == list(ref["assistant_masks"]) and 1 in mask
    # Without a system message the base template's default differs, and the mask still covers only the replies.
    ids, mask = prefix_mask(base, MULTI_TURN)
    replies = base.decode([i for i, m in zip(ids, mask) if m])
    assert replies == "Hello!<|im_end|>4<|im_end|>"


def test_template_without_prefix_property_stops_in_one_line(instruct_dir, tmp_path, capsys):
    tok = published.load_tokenizer(instruct_dir)
    tok.chat_template = NO_PREFIX_TEMPLATE
    with pytest.raises(DataError, match="no SFT example left.*chat_template"):
        tokenize_conversations(arithmetic_rows(4), tok, max_length=64)
    # Through the CLI: one line, exit status 2, nothing written.
    jinja = tmp_path / "odd.jinja"
    jinja.write_text(NO_PREFIX_TEMPLATE)
    path = _recipe(tmp_path, instruct_dir, [{**_sft_stage(tmp_path), "chat_template": str(jinja)}])
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "prefix property" in err.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "sft" / "final").exists()


# --- stages from the published layout, and what they write ------------------------------------


def _sft_stage(tmp_path: Path, **options) -> dict:
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(16))
    return {"name": "sft", "kind": "sft", "data": {"sources": [{"path": str(data)}]}, "max_length": 64,
            "packing": False, "per_device_train_batch_size": 8, "max_steps": 2, "learning_rate": 1e-3,
            "save_steps": 10, "logging_steps": 1, "dtype": "float32", **options}


def _recipe(tmp_path: Path, model: Path | str, stages: list[dict], **top) -> Path:
    raw = {"model": str(model), "run_dir": str(tmp_path / "run"), "seed": 0, "stages": stages, **top}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _pairs(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {10 + i}+{11 + i}?"}],
             "chosen": [{"role": "assistant", "content": str(21 + 2 * i)}],
             "rejected": [{"role": "assistant", "content": str(22 + 2 * i)}]} for i in range(n)]


def test_chain_from_published_instruct_writes_portable_checkpoints(instruct_dir, demo_tokenizer, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pairs(8))
    queries = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": f"What is {i}+1?"}],
                                                  "verifier": "exact", "answer": str(i + 1)} for i in range(4)])
    few = {"max_steps": 1, "logging_steps": 1, "save_steps": 10, "dtype": "float32"}
    stages = [
        _sft_stage(tmp_path, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
        {"name": "rs", "kind": "rejection_sampling", "init_from": str(instruct_dir), "data": {"sources": [{"path": str(queries)}]},
         "samples_per_prompt": 2, "max_new_tokens": 3, "dtype": "float32"},
        {"name": "dpo", "kind": "dpo", "init_from": "sft", "data": {"sources": [{"path": str(pairs)}]},
         "max_length": 64, "per_device_train_batch_size": 4, **few},
        {"name": "rm", "kind": "reward_model", "init_from": str(instruct_dir), "data": {"sources": [{"path": str(pairs)}]},
         "max_length": 64, "per_device_train_batch_size": 4, "eval_fraction": 0.25, **few},
        {"name": "rm_likelihood", "kind": "reward_model", "score": "likelihood", "init_from": str(instruct_dir),
         "data": {"sources": [{"path": str(pairs)}]}, "max_length": 64, "per_device_train_batch_size": 4,
         "eval_fraction": 0.25, **few},
        {"name": "grpo", "kind": "grpo", "data": {"sources": [{"path": str(queries)}]},
         "rewards": [{"kind": "reward_model", "source": "rm"},
                     {"kind": "reward_model", "source": "rm_likelihood", "name": "likelihood"}],
         "num_generations": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
         "max_completion_length": 3, **few},
    ]
    manifest = run_recipe(load_recipe(_recipe(tmp_path, instruct_dir, stages)))
    entries = manifest["stages"]
    assert all(entries[s]["status"] == "completed" for s in ("sft", "rs", "dpo", "rm", "rm_likelihood", "grpo"))
    assert entries["sft"]["metrics"]["lengths"]["examples_out"] == 16  # the known breakage: all were dropped
    for name in ("sft", "dpo", "grpo"):
        config = assert_portable_checkpoint(Path(entries[name]["output"]), QWEN25_INSTRUCT_TEMPLATE, demo_tokenizer)
        # A 2-shard input is written as shards of its largest shard's size (scaled to float32).
        assert len(list(Path(entries[name]["output"]).glob("*.safetensors"))) > 1
    sft_config = json.loads((Path(entries["sft"]["output"]) / "config.json").read_text())
    assert sft_config["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert AutoConfig.from_pretrained(entries["dpo"]["output"]).rope_parameters["rope_type"] == "yarn"  # inherited
    assert "rope_scaling" not in config  # grpo started from the published (unscaled) model
    assert_portable_checkpoint(Path(entries["rm"]["output"]), QWEN25_INSTRUCT_TEMPLATE, demo_tokenizer,
                               AutoModelForSequenceClassification)
    # The likelihood RM: a portable causal LM that says how it scores; under Qwen's published template (which
    # adds its default system turn) the scored span is exactly the assistant turn's content and its end.
    out = Path(entries["rm_likelihood"]["output"])
    config = assert_portable_checkpoint(out, QWEN25_INSTRUCT_TEMPLATE, demo_tokenizer)
    assert config["reward_score"]["kind"] == "likelihood"
    published_tokenizer = published.load_tokenizer(out)
    ids, _, start = encode(published_tokenizer, [{"role": "user", "content": "What is 12+30?"}], "42", 10**6)
    assert published_tokenizer.decode(ids[start:]) == "42<|im_end|>\n"
    assert "You are Qwen" in published_tokenizer.decode(ids[:start])
    grpo_logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/likelihood/mean" in r for r in grpo_logs if r.get("stage") == "grpo")


def test_base_checkpoint_trains_with_prefix_masks_and_keeps_its_template(base_dir, demo_tokenizer, tmp_path):
    entry = run_recipe(load_recipe(_recipe(tmp_path, base_dir, [_sft_stage(tmp_path)])))["stages"]["sft"]
    assert entry["metrics"]["lengths"]["examples_out"] == 16
    config = assert_portable_checkpoint(Path(entry["output"]), QWEN25_BASE_TEMPLATE, demo_tokenizer)
    assert config["eos_token_id"] == demo_tokenizer.convert_tokens_to_ids("<|endoftext|>")  # as the base has it


def test_writer_dtype_and_shard_size(instruct_dir, tmp_path):
    model = published.load_pretrained(instruct_dir, AutoModelForCausalLM, dtype=torch.float32,
                                      attn_implementation="sdpa")
    tok = published.load_tokenizer(instruct_dir)
    out = published.save_checkpoint(model, tok, tmp_path / "bf16", out_dtype="bfloat16", max_shard_size="60KB")
    weights = _weights(out)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16} and len(list(out.glob("*.safetensors"))) >= 4
    assert model.dtype == torch.float32  # the cast is of what is written, not of the trained model
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name].to(torch.bfloat16).float())


# --- long context --------------------------------------------------------------------------------


def test_max_length_beyond_the_model_stops_before_any_work(instruct_dir, tmp_path, capsys):
    too_long = _recipe(tmp_path, instruct_dir, [_sft_stage(tmp_path, max_length=40_000)])
    with pytest.raises(RecipeError, match=r"stages\[0\]\.max_length: 40000 is beyond the 32768 positions"):
        load_recipe(too_long)
    assert cli.main(["run", str(too_long)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    load_recipe(_recipe(tmp_path, instruct_dir, [_sft_stage(tmp_path, max_length=131_072, rope_scaling=yarn)]))
    with pytest.raises(RecipeError, match="131072 positions"):
        load_recipe(_recipe(tmp_path, instruct_dir, [_sft_stage(tmp_path, max_length=131_073, rope_scaling=yarn)]))
    # A later stage inherits what its start attends: DPO from the scaled SFT may go long, one from the model not.
    dpo = {"name": "dpo", "kind": "dpo", "init_from": "sft", "data": {"sources": [{"path": "p.jsonl"}]},
           "max_length": 100_000}
    load_recipe(_recipe(tmp_path, instruct_dir, [_sft_stage(tmp_path, rope_scaling=yarn), dpo]))
    with pytest.raises(RecipeError, match=r"stages\[1\]\.max_length"):
        load_recipe(_recipe(tmp_path, instruct_dir, [_sft_stage(tmp_path), dpo]))
