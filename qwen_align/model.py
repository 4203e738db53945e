"""The one Qwen2.5 model definition: presets, and one loader for policies and reward models.

Policy and reference are `Qwen2ForCausalLM`; the reward model is `Qwen2ForSequenceClassification` with one
label. Both come from the same loader and the same checkpoint format (a transformers directory).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from .checkpoints import published
from .errors import UserError
from .presets import PRESETS, RMS_NORM_EPS, ROPE_THETA, preset_name
from .reward_score import CONFIG_KEY as REWARD_SCORE_KEY

log = logging.getLogger(__name__)

ModelRole = Literal["policy", "reward"]


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> Qwen2Config:
    p = PRESETS[name]
    vocab = p.vocab_size
    if tokenizer is not None:
        vocab = max(vocab, len(tokenizer))
    if vocab == 0:
        raise UserError(f"preset '{name}' takes its vocabulary size from a tokenizer; give the recipe a `tokenizer`")
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=p.tie_word_embeddings,
        hidden_act="silu",
        use_sliding_window=False,
    )
    if tokenizer is not None:
        config.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return config


def resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"dtype '{dtype}' is not one of auto, float32, bfloat16, float16") from None


def resolve_attn_implementation(requested: str) -> str:
    """'auto' picks flash_attention_2 when it is installed and a GPU is present, else sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(
    source: str | Path,
    role: ModelRole = "policy",
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str = "float32",
    attn_implementation: str = "auto",
    seed: int = 0,
    quantize: str | None = None,
    rope_scaling: dict | None = None,
) -> PreTrainedModel:
    """A policy (causal LM) or reward model (1-label classifier) from a checkpoint dir or a preset name.

    A likelihood reward model's mark is dropped (see `load_reward_scorer`).
    A preset gives a randomly initialised model (tests and the demo); a directory is loaded with
    `from_pretrained` (published layout or ours), an adapter folder (`lora.save: adapter`) as its base with the
    adapter merged. A reward model loaded from a policy checkpoint gets a fresh scoring head, initialised as
    transformers does (normal(0, initializer_range)). `quantize` (4bit, 8bit) loads for QLoRA. `rope_scaling`
    (the recipe's {type, factor, original_max_position_embeddings}) replaces the config's RoPE parameters.
    """
    from .lora import is_adapter_folder, load_adapter_folder, prepare_quantized, quantized_load_kwargs

    cls = Qwen2ForCausalLM if role == "policy" else Qwen2ForSequenceClassification
    attn = resolve_attn_implementation(attn_implementation)
    torch_dtype = resolve_dtype(dtype)
    name = preset_name(str(source))
    path = Path(source)
    if name is not None and not path.exists():
        config = preset_config(name, tokenizer)
        if rope_scaling:
            config.rope_parameters = published.rope_parameters(rope_scaling, ROPE_THETA)
        config._attn_implementation = attn
        if role == "reward":
            config.num_labels = 1
        torch.manual_seed(seed)
        model = cls(config)
        if torch_dtype not in ("auto", torch.float32):
            model = model.to(torch_dtype)
        log.info("built preset '%s' with random init (%.2fM parameters)", name, model.num_parameters() / 1e6)
    elif is_adapter_folder(path):
        def load_base(base, base_role, base_tokenizer, base_seed):
            return load_model(base, base_role, tokenizer=base_tokenizer, dtype=dtype,
                              attn_implementation=attn_implementation, seed=base_seed, rope_scaling=rope_scaling)

        model = load_adapter_folder(path, role, load_base, tokenizer)
    elif not published.is_checkpoint(path):
        raise UserError(f"model '{source}': not a preset ({', '.join(PRESETS)}) nor a checkpoint directory with config.json")
    else:
        model = published.load_pretrained(path, cls, dtype=torch_dtype, attn_implementation=attn,
                                          num_labels=1 if role == "reward" else None, rope_scaling=rope_scaling,
                                          **(quantized_load_kwargs(quantize) if quantize else {}))
        if quantize:
            model = prepare_quantized(model)
        quantize = None  # done while loading
    if quantize:  # bitsandbytes quantizes while loading: go through a saved copy of the built/merged model
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = prepare_quantized(cls.from_pretrained(tmp, attn_implementation=attn, dtype=torch_dtype,
                                                          **quantized_load_kwargs(quantize)))
    if role == "reward" and model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, REWARD_SCORE_KEY):
        # A likelihood RM started from (by any stage) is a start, not a scorer: what the stage writes is
        # what that stage makes. Scorers load through `load_reward_scorer`, which keeps the mark.
        delattr(model.config, REWARD_SCORE_KEY)
        if role == "reward":
            log.warning("%s is a likelihood reward model; loaded as the start of a new scalar-head RM (a fresh "
                        "head). To score with it, use qwen_align.model.load_reward_scorer.", source)
    return model


def load_reward_scorer(source: str | Path, *, tokenizer: PreTrainedTokenizerBase | None = None,
                       dtype: str = "float32", attn_implementation: str = "auto") -> PreTrainedModel:
    """A trained reward model for scoring: a likelihood RM (a causal LM marked in its config.json) as the
    marked causal LM, anything else as a 1-label classifier (see `qwen_align.reward_score`)."""
    from .reward_score import checkpoint_likelihood_spec, mark_likelihood

    spec = checkpoint_likelihood_spec(source)
    role = "policy" if spec is not None else "reward"
    model = load_model(source, role, tokenizer=tokenizer, dtype=dtype, attn_implementation=attn_implementation)
    if spec is not None:
        mark_likelihood(model, spec["beta"])
    return model


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, **options) -> Path:
    """Write model + tokenizer in the published layout (see `qwen_align.checkpoints.published.save_checkpoint`)."""
    return published.save_checkpoint(model, tokenizer, out_dir, **options)
