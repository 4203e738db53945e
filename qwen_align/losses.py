"""Memory- and time-efficient causal-LM loss that never materialises the ``[tokens, vocab]`` logits.

The core is :func:`fused_linear_cross_entropy`, a ``torch.autograd.Function`` that computes the cross-entropy of
``hidden @ weight.T (+ bias)`` *and its gradients* in a single pass over token chunks:

* only tokens whose label is not ``ignore_index`` are projected at all;
* for each chunk of ``c`` valid tokens the ``[c, V]`` logits are written into one reused fp32 buffer, reduced
  (row max, target logit, ``sum(exp)``) and turned in place into the unnormalised softmax ``E``;
* the gradients are then taken from ``E`` directly: the softmax normaliser ``1/s`` and the one-hot term are applied
  to the small ``[c, H]`` / ``[V, H]`` operands instead of the big buffer::

      grad_h_c  = (E @ W) * (1/s) - W[target]
      grad_W   += E^T @ (h_c * (1/s))   then   grad_W[target] -= h_c
      grad_b   += E^T @ (1/s)           then   grad_b[target] -= 1

  so each chunk costs three GEMMs and a handful of streaming passes, with no recomputation in backward (TRL's
  ``ChunkedLogProbFunction`` recomputes every logits tile in backward, i.e. four GEMMs).
* ``backward`` only multiplies the saved gradients by the incoming scalar ``grad_output``.

The logits are produced in base-2 units (the hidden chunk is pre-multiplied by ``log2(e)``) because ``exp2`` is
about 3x faster than ``exp`` on CPU; the loss is converted back to nats exactly.

:func:`causal_lm_loss` runs a Hugging Face causal LM backbone (optionally PEFT-wrapped) and applies the fused loss to
the shifted hidden states; on CUDA, when ``liger_kernel`` is installed, it uses Liger's fused linear cross-entropy.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

__all__ = [
    "FusedLossOutput",
    "install_fused_loss_forward",
    "DEFAULT_CPU_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
    "causal_lm_loss",
    "default_chunk_size",
    "fused_linear_cross_entropy",
]

_LOG2E = 1.4426950408889634  # log2(e)
_LN2 = math.log(2.0)

# Target size of the per-chunk [chunk, V] fp32 logits buffer. Tuned on a 2-core AMD EPYC (Zen 4, 32 MiB L3) with
# V=151,936 and H=64 (benchmarks/fused_ce_micro.py --sweep): 256 tokens (~148 MiB) was the fastest chunk or within noise
# of it. The three GEMMs dominate (~85% of the time); with fewer than ~128 tokens per chunk their efficiency drops
# (the forward GEMM is ~25% slower at 64 tokens and ~50% slower at 32) and the [V, H] weight-gradient accumulator is
# re-streamed once per chunk, while chunks above ~512 tokens are no faster and only cost memory.
DEFAULT_CPU_CHUNK_BYTES = 150 * 2**20
DEFAULT_CUDA_CHUNK_BYTES = 256 * 2**20
# Candidate rows (target logit == row max) are re-checked with an exact argmax in groups of this many rows, so the
# temporary copy stays small.
_ARGMAX_GROUP = 32


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk so that one ``[chunk, vocab_size]`` fp32 buffer is about the tuned target size."""
    device = torch.device(device)
    target = DEFAULT_CUDA_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CPU_CHUNK_BYTES
    chunk = target // (4 * max(int(vocab_size), 1))
    # Round down to a multiple of 16 (GEMM friendly) but never below 16 tokens.
    return max(16, chunk // 16 * 16)


def _denominator(num_items_in_batch: Any, num_valid: int) -> float:
    if num_items_in_batch is None:
        return float(max(num_valid, 1))
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.item()
    # Guard against an all-ignored global batch (0 items): the loss is then 0, not NaN.
    return float(num_items_in_batch) if num_items_in_batch else 1.0


def _fused_ce_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int | None,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
):
    """One pass over the valid tokens.

    Returns ``(nll_sum, num_valid, num_correct, grad_hidden, grad_weight, grad_bias)`` where the sums and grads are
    unnormalised (gradients of the *summed* NLL), fp32, and ``None`` where not requested.
    """
    device = hidden.device
    N, H = hidden.shape
    V = weight.shape[0]

    valid = labels != ignore_index
    idx = valid.nonzero().squeeze(1)
    num_valid = idx.numel()

    grad_hidden = torch.zeros((N, H), device=device, dtype=torch.float32) if need_hidden_grad else None
    # With a bias gradient, the weight- and bias-gradient GEMMs are fused into one [V, H + 1] accumulator by
    # appending the column 1/s to the right-hand side.
    acc_cols = (H if need_weight_grad else 0) + (1 if need_bias_grad else 0)
    acc = torch.zeros((V, acc_cols), device=device, dtype=torch.float32) if acc_cols else None

    nll_sum = torch.zeros((), device=device, dtype=torch.float64)
    num_correct = torch.zeros((), device=device, dtype=torch.int64)

    if num_valid > 0:
        w32 = weight if weight.dtype == torch.float32 else weight.float()
        b2 = None if bias is None else bias.float() * _LOG2E
        if chunk_size is None:
            chunk_size = default_chunk_size(V, device)
        chunk_size = max(1, min(int(chunk_size), num_valid))
        buf = torch.empty((chunk_size, V), device=device, dtype=torch.float32)
        targets_all = labels.index_select(0, idx).long()
        if bool(((targets_all < 0) | (targets_all >= V)).any()):
            raise IndexError(f"label out of range [0, {V}) that is not ignore_index={ignore_index}")

        for start in range(0, num_valid, chunk_size):
            rows = idx[start : start + chunk_size]
            t = targets_all[start : start + chunk_size]
            n = rows.numel()
            h = hidden.index_select(0, rows).float()  # [n, H]
            logits = buf[:n]
            # Logits in base-2 units: z2 = z * log2(e).
            h2 = h * _LOG2E
            if b2 is None:
                torch.mm(h2, w32.t(), out=logits)
            else:
                torch.addmm(b2, h2, w32.t(), out=logits)

            row_max = logits.amax(dim=1)  # [n]
            target_logit = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            # Top-1: the target is the argmax iff it reaches the row max and no earlier column ties with it. Only rows
            # that reach the max need the (expensive) exact argmax.
            candidates = (target_logit >= row_max).nonzero().squeeze(1)
            if candidates.numel():
                for group in candidates.split(_ARGMAX_GROUP):
                    num_correct += (logits.index_select(0, group).argmax(dim=1) == t.index_select(0, group)).sum()

            # E = exp(z - max) in place.
            logits.sub_(row_max.unsqueeze(1))
            logits.exp2_()
            sum_exp = logits.sum(dim=1)  # [n], >= 1
            # nll = logsumexp(z) - z_t = (max2 - z2_t) * ln2 + ln(s)
            nll = (row_max - target_logit) * _LN2 + sum_exp.log()
            nll_sum += nll.sum(dtype=torch.float64)

            inv_s = sum_exp.reciprocal_()  # [n]
            if grad_hidden is not None:
                g = torch.mm(logits, w32)  # [n, H]
                g.mul_(inv_s.unsqueeze(1))
                g.sub_(w32.index_select(0, t))
                grad_hidden.index_copy_(0, rows, g)
            if acc is not None:
                parts = []
                if need_weight_grad:
                    parts.append(h * inv_s.unsqueeze(1))
                if need_bias_grad:
                    parts.append(inv_s.unsqueeze(1))
                rhs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
                acc.addmm_(logits.t(), rhs)
                # One-hot term: subtract [h_c, 1] from the target rows.
                parts = []
                if need_weight_grad:
                    parts.append(h)
                if need_bias_grad:
                    parts.append(h.new_ones((n, 1)))
                onehot_rhs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
                acc.index_add_(0, t, onehot_rhs, alpha=-1)
        del buf

    grad_weight = acc[:, :H] if (acc is not None and need_weight_grad) else None
    grad_bias = acc[:, -1] if (acc is not None and need_bias_grad) else None
    return nll_sum, num_valid, num_correct, grad_hidden, grad_weight, grad_bias


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, num_items_in_batch, chunk_size, needs):
        need_h, need_w, need_b = needs
        with torch.autocast(hidden.device.type, enabled=False):
            nll_sum, num_valid, num_correct, g_h, g_w, g_b = _fused_ce_pass(
                hidden, weight, bias, labels, ignore_index, chunk_size, need_h, need_w, need_b
            )
        inv_denom = 1.0 / _denominator(num_items_in_batch, num_valid)
        # Fold 1/denominator into the saved gradients now (cheap: [N, H] and [V, H]).
        for g in (g_h, g_w, g_b):
            if g is not None:
                g.mul_(inv_denom)
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = (nll_sum * inv_denom).to(torch.float32)
        num_tokens = torch.tensor(num_valid, device=hidden.device)
        nll_sum = nll_sum.to(torch.float32)
        ctx.mark_non_differentiable(num_correct, num_tokens, nll_sum)
        return loss, num_correct, num_tokens, nll_sum

    @staticmethod
    def backward(ctx, grad_loss, *_):
        g_h, g_w, g_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes

        def scale(g, dtype):
            if g is None or grad_loss is None:
                return None
            return (g * grad_loss.to(g.dtype)).to(dtype)

        return scale(g_h, h_dtype), scale(g_w, w_dtype), scale(g_b, b_dtype), None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without materialising the logits.

    Args:
        hidden: ``[N, H]`` hidden states, already shifted (row ``i`` predicts ``labels[i]``). Any float dtype.
        weight: ``[V, H]`` LM-head (or tied embedding) weight.
        labels: ``[N]`` integer targets; ``ignore_index`` marks tokens that do not contribute.
        bias: optional ``[V]`` LM-head bias.
        ignore_index: label value to skip.
        num_items_in_batch: denominator of the summed token loss (e.g. the global token count under gradient
            accumulation). Defaults to the number of valid tokens here; a zero/absent count is clamped to 1.
        chunk_size: valid tokens per chunk; ``None`` picks :func:`default_chunk_size` (a ~150 MiB fp32 buffer on
            CPU, i.e. 256 tokens at V=151,936; ~256 MiB on CUDA).

    Returns:
        ``(loss, stats)`` where ``loss`` is an fp32 scalar and ``stats`` holds detached tensors ``num_tokens`` (valid
        tokens), ``num_correct`` (valid tokens whose argmax logit equals the label) and ``nll_sum`` (summed NLL).

    All math runs in fp32 (autocast is disabled inside); gradients are returned in the inputs' dtypes. The gradients
    are computed during the forward pass, so calling this under ``torch.no_grad()`` (or with nothing requiring grad)
    skips them entirely.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"expected hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
            f"{tuple(labels.shape)}"
        )
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    labels = labels.to(hidden.device)

    grad_enabled = torch.is_grad_enabled()
    needs = (
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    if any(needs):
        loss, num_correct, num_tokens, nll_sum = _FusedLinearCrossEntropyFunction.apply(
            hidden, weight, bias, labels, ignore_index, num_items_in_batch, chunk_size, needs
        )
    else:
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            nll_sum, num_valid, num_correct, *_ = _fused_ce_pass(
                hidden, weight, bias, labels, ignore_index, chunk_size, False, False, False
            )
        loss = (nll_sum / _denominator(num_items_in_batch, num_valid)).to(torch.float32)
        nll_sum = nll_sum.to(torch.float32)
        num_tokens = torch.tensor(num_valid, device=hidden.device)
    stats = {
        "num_tokens": num_tokens.detach(),
        "num_correct": num_correct.detach(),
        "nll_sum": nll_sum.detach().to(torch.float32),
    }
    return loss, stats


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face causal LM wrapper
# --------------------------------------------------------------------------------------------------------------------

# Keys of a training batch that are loss-side only and must not reach the backbone.
_NON_BACKBONE_KEYS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict", "use_cache")


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / accelerate wrappers
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "get_base_model"):
        model = model.module
    # PEFT: the transformers model with the adapters injected in place.
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    base = _unwrap(model)
    prefix = getattr(base, "base_model_prefix", "model")
    backbone = getattr(base, prefix, None)
    if backbone is None or backbone is base:
        backbone = getattr(base, "model", None)
    if backbone is None:
        raise ValueError(f"cannot find the backbone of {type(base).__name__} (base_model_prefix={prefix!r})")
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm head)")
    # A LoRA adapter on the LM head would be silently ignored by reading `head.weight` (the base weight).
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is optional
        BaseTunerLayer = ()
    if BaseTunerLayer and isinstance(head, BaseTunerLayer):
        if not getattr(head, "disable_adapters", False) and not getattr(head, "merged", False):
            raise NotImplementedError(
                "causal_lm_loss does not support a LoRA adapter on the LM head; use modules_to_save=['lm_head'] or "
                "leave lm_head out of target_modules"
            )
    return base, backbone, head


def _check_plain_logits(config) -> None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, attr, None)
        if value is not None and value != 1.0:
            raise NotImplementedError(f"causal_lm_loss does not support models with {attr}={value}")


def _liger_flce():
    """Liger's functional fused linear cross-entropy, or None when not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # ImportError, or a broken triton install
        return None
    return liger_fused_linear_cross_entropy


def _liger_loss(fn, hidden, weight, bias, labels, ignore_index, num_items_in_batch):
    """Liger path (CUDA only). NOTE: not exercised in this repository's CPU test suite."""
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"ignore_index": ignore_index, "reduction": "sum"}
    if "accum_dtype" in params:
        kwargs["accum_dtype"] = torch.float32
    if "return_token_accuracy" in params:
        kwargs["return_token_accuracy"] = True
    valid = labels != ignore_index
    num_valid = int(valid.sum())
    # Only the valid rows are projected (the caller routes all-ignored batches to the torch path).
    out = fn(hidden[valid], weight, labels[valid], bias, **kwargs)
    if isinstance(out, torch.Tensor):
        loss_sum, accuracy = out, None
    elif hasattr(out, "loss"):
        loss_sum, accuracy = out.loss, getattr(out, "token_accuracy", None)
    else:  # (loss, z_loss) tuple of older versions
        loss_sum, accuracy = out[0], None
    loss = loss_sum.float() / _denominator(num_items_in_batch, num_valid)
    if accuracy is not None:
        num_correct = (accuracy.detach().float() * num_valid).round().long()
    else:
        num_correct = torch.tensor(float("nan"), device=hidden.device)
    stats = {
        "num_tokens": torch.tensor(num_valid, device=hidden.device),
        "num_correct": num_correct,
        "nll_sum": loss_sum.detach().float(),
    }
    return loss, stats


def causal_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    num_items_in_batch: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    *,
    ignore_index: int = -100,
    use_liger: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy of a Hugging Face causal LM without materialising the logits.

    Runs the backbone (``model.model`` / ``base_model_prefix``; PEFT models are unwrapped with
    ``get_base_model()``) on ``inputs`` minus the labels, with ``use_cache=False``; every other key
    (``attention_mask``, ``position_ids``, ``cu_seq_lens_*``, ...) is passed through. Then scores
    ``hidden[:, :-1]`` against ``labels[:, 1:]`` (or ``hidden`` against pre-shifted ``shift_labels``).

    Packed (padding-free) batches: a token whose next position has ``position_ids == 0`` starts no prediction inside
    its own document, so its label is masked. TRL's collator already sets ``labels = -100`` where
    ``position_ids == 0``, which gives the same result; the mask here protects hand-made packed batches.

    On CUDA with ``liger_kernel`` installed (and ``use_liger`` not False) Liger's fused linear cross-entropy is used
    instead of :func:`fused_linear_cross_entropy`.

    Returns ``(loss, stats)`` as :func:`fused_linear_cross_entropy`.

    Called on a DDP/FSDP-wrapped model this bypasses the wrapper's forward (no gradient sync); training code
    calls the wrapped model instead, after :func:`install_fused_loss_forward`.
    """
    base, backbone, head = _backbone_and_head(model)
    return _fused_causal_lm_loss(base, backbone, head, inputs, num_items_in_batch, chunk_size, ignore_index, use_liger)


def _fused_causal_lm_loss(base, backbone, head, inputs, num_items_in_batch, chunk_size, ignore_index, use_liger):
    _check_plain_logits(base.config)

    batch = dict(inputs)
    labels = batch.get("labels")
    shift_labels = batch.get("shift_labels")
    if labels is None and shift_labels is None:
        raise ValueError("causal_lm_loss needs `labels` or `shift_labels` in inputs")
    for key in _NON_BACKBONE_KEYS:
        batch.pop(key, None)

    outputs = backbone(**batch, use_cache=False, return_dict=True)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]

    if shift_labels is not None:
        targets = shift_labels
    else:
        hidden = hidden[:, :-1]
        targets = labels[:, 1:]
        position_ids = batch.get("position_ids")
        if (
            isinstance(position_ids, torch.Tensor)
            and position_ids.dim() == 2
            and position_ids.shape[-1] == labels.shape[-1]
        ):
            next_pos = position_ids[:, 1:].to(targets.device).expand_as(targets)
            targets = targets.masked_fill(next_pos == 0, ignore_index)

    weight, bias = head.weight, getattr(head, "bias", None)
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)
    targets = targets.reshape(-1).to(weight.device)

    if use_liger is not False and weight.device.type == "cuda":
        fn = _liger_flce()
        if fn is not None and bool((targets != ignore_index).any()):
            return _liger_loss(fn, hidden, weight, bias, targets, ignore_index, num_items_in_batch)
    return fused_linear_cross_entropy(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
    )


@dataclass
class FusedLossOutput(ModelOutput):
    """What the causal LM's forward returns when called with ``fused_loss=True``: the loss and its stats, no logits."""

    loss: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    num_correct: torch.Tensor | None = None
    nll_sum: torch.Tensor | None = None


def install_fused_loss_forward(
    model: nn.Module, chunk_size: int | None = None, *, ignore_index: int = -100, use_liger: bool | None = None
) -> None:
    """Give the causal LM inside ``model`` (PEFT-wrapped or not) a forward that, called with ``fused_loss=True``
    (and ``labels`` or ``shift_labels``), returns a :class:`FusedLossOutput` from :func:`causal_lm_loss`'s fused
    path instead of logits; without the flag it is the model's own forward.

    The forward is replaced on the instance, as Liger replaces Qwen2's: the trainer then calls the *wrapped*
    model (``model(**inputs, fused_loss=True)``), so DDP's forward (which prepares the gradient all-reduce) and
    FSDP's unshard hooks on the root module run as for any forward.
    """
    base, backbone, head = _backbone_and_head(model)
    if getattr(base, "_fused_loss_installed", False):
        return
    original = base.forward

    @functools.wraps(original)  # keeps the signature the Trainer inspects (column pruning, loss kwargs)
    def forward(*args, fused_loss: bool = False, num_items_in_batch=None, **kwargs):
        if not fused_loss:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        # PEFT forwards its own keyword defaults (inputs_embeds=None, output_attentions=None, ...).
        inputs = {k: v for k, v in kwargs.items() if v is not None}
        loss, stats = _fused_causal_lm_loss(
            base, backbone, head, inputs, num_items_in_batch, chunk_size, ignore_index, use_liger
        )
        return FusedLossOutput(loss=loss, **stats)

    base.forward = forward
    base._fused_loss_installed = True
