"""Packed rows attend within their own document only, on every attention implementation.

TRL's `bfd` packing makes the batch padding-free: one row of concatenated documents, `position_ids` that restart
at 0 at each document, no `attention_mask`. flash-attention reads the document boundaries from those positions
(or TRL's `cu_seq_lens_*`). For the others transformers' `create_causal_mask` does the same
(`masking_utils.find_packed_sequence_indices`: a position that is not the previous one + 1 starts a document)
and ANDs a same-document mask into the causal one, as long as no `attention_mask` and no KV cache are passed;
TRL's `compute_loss` and our fused loss both call the model with `use_cache=False`.

What the mask costs differs: `sdpa` and `eager` get a dense [rows, 1, T, T] mask and compute every block of it,
so a packed row pays for T^2 attention; `flex_attention` gets a BlockMask and skips blocks that are wholly
masked, so a row of documents of length S costs about T*S.
"""

from __future__ import annotations

from qwen_align.errors import UserError

DENSE_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def check_document_masking(attn_implementation: str, option: str = "packing") -> None:
    """Refuse packing where this transformers would let packed documents attend to each other."""
    if "flash" in attn_implementation:
        return
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        import transformers

        raise UserError(f"{option}: transformers {transformers.__version__} builds no per-document mask for "
                        f"{attn_implementation} attention (packed documents would attend to each other); upgrade "
                        "transformers, use flash_attention_2, or set `packing: false`") from None


def packing_cost_note(attn_implementation: str) -> str | None:
    """One line on what packing costs under this attention, or None where it costs nothing extra."""
    if attn_implementation in DENSE_MASK_IMPLEMENTATIONS:
        return (f"packing with {attn_implementation} attention: each packed row is masked per document but computes "
                "the whole max_length^2 attention; `attn_implementation: flex_attention` (or flash_attention_2 on a "
                "GPU) skips the masked blocks, and `packing: false` suits short examples on CPU")
    return None
