"""Lay out a checkpoint folder the way Qwen publishes Qwen2.5 checkpoints, from a tiny config.

Written without our writer (qwen_align.checkpoints.published) so that reading it tests the reader against the
published layout: transformers 4 field names in config.json, bf16 safetensors shards we split ourselves with
their index, generation_config.json, tokenizer.json + vocab.json + merges.txt, and a tokenizer_config.json
whose chat_template is the text Qwen2.5's tokenizer_config.json carries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

# Qwen2.5-Instruct's chat template as published (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct).
QWEN25_INSTRUCT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# The base models' variant: the same layout with the default system prompt "You are a helpful assistant.".
QWEN25_BASE_TEMPLATE = QWEN25_INSTRUCT_TEMPLATE.replace(
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "You are a helpful assistant."
)

# A template no prefix render can follow: it prints the assistant count at the very end.
NO_PREFIX_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    "{{- '<|endoftext|>' ~ (messages | length) }}"
)


def tiny_qwen_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, **overrides) -> Qwen2Config:
    fields = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False)
    fields.update(overrides)
    return Qwen2Config(**fields)


def _published_config(config: Qwen2Config, eos_id: int, bos_id: int) -> dict:
    """config.json as Qwen publishes it (transformers 4 names; no rope_parameters, no layer_types)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "max_window_layers": config.num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": config.vocab_size,
    }


def _write_shards(state: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return names


def _write_tokenizer(tokenizer, out: Path, kind: str, template: str) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    (out / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False), encoding="utf-8")
    bpe = backend["model"]
    (out / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": t["special"]} for t in backend["added_tokens"]}
    special = [t["content"] for t in backend["added_tokens"] if t["special"] and t["content"] != "<|endoftext|>"]
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": special,
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>" if kind == "instruct" else "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def write_published_checkpoint(
    out: Path,
    tokenizer,
    *,
    kind: str = "instruct",
    template: str | None = None,
    config: Qwen2Config | None = None,
    shard_bytes: int = 200_000,
    seed: int = 0,
) -> Path:
    """A Qwen2.5 checkpoint folder as published, random weights from `config` (default: a tiny one sized to
    the tokenizer). kind: `instruct` (eos <|im_end|>) or `base` (eos <|endoftext|>)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or tiny_qwen_config(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    _write_shards(state, out, shard_bytes)
    endoftext, im_end = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = im_end if kind == "instruct" else endoftext
    (out / "config.json").write_text(json.dumps(_published_config(config, eos, endoftext), indent=2))
    if kind == "instruct":
        gen = {"bos_token_id": endoftext, "pad_token_id": endoftext, "do_sample": True, "eos_token_id": [im_end, endoftext],
               "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}
    else:
        gen = {"bos_token_id": endoftext, "do_sample": False, "eos_token_id": endoftext, "max_new_tokens": 2048,
               "transformers_version": "4.37.0"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if template is None:
        template = QWEN25_INSTRUCT_TEMPLATE if kind == "instruct" else QWEN25_BASE_TEMPLATE
    _write_tokenizer(tokenizer, out, kind, template)
    return out
