"""Qwen2.5 dense model shapes, by preset name (kept free of torch so recipes validate quickly)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    vocab_size: int
    max_position_embeddings: int


# Published Qwen2.5 dense shapes (report Table 1 and the released configs). 7B and larger carry 152,064
# embedding rows, the small ones 151,936; both are padding above the tokenizer's 151,665 ids.
PRESETS: dict[str, Preset] = {
    "0.5b": Preset(896, 24, 14, 2, 4864, True, 151_936, 32_768),
    "1.5b": Preset(1536, 28, 12, 2, 8960, True, 151_936, 32_768),
    "3b": Preset(2048, 36, 16, 2, 11008, True, 151_936, 32_768),
    "7b": Preset(3584, 28, 28, 4, 18944, False, 152_064, 131_072),
    "14b": Preset(5120, 48, 40, 8, 13824, False, 152_064, 131_072),
    "32b": Preset(5120, 64, 40, 8, 27648, False, 152_064, 131_072),
    "72b": Preset(8192, 80, 64, 8, 29568, False, 152_064, 131_072),
    # Same architecture, small enough to train on a laptop CPU in minutes. vocab_size 0 = size of the tokenizer;
    # 32,768 positions like the small Qwen2.5 models, so the report's default max_length passes the length check.
    "tiny": Preset(128, 4, 4, 2, 512, True, 0, 32_768),
}

ROPE_THETA = 1_000_000.0
RMS_NORM_EPS = 1e-6


def preset_name(model: str) -> str | None:
    """'qwen2.5-7b', '7B', 'tiny' -> the preset key; None if `model` is not a preset name."""
    key = model.lower().removeprefix("qwen2.5-").removeprefix("qwen2.5_")
    return key if key in PRESETS else None
