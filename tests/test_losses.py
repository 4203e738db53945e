"""Tests of qwen_align.losses (CPU, small sizes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen_align.losses import causal_lm_loss, default_chunk_size, fused_linear_cross_entropy

N, H, V = 300, 32, 1000


def _data(seed=0, dtype=torch.float32, bias=True, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::ignore_every] = -100
    labels[-3:] = -100
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, denom=None):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    if denom is None:
        denom = (labels != -100).sum().clamp(min=1)
    return total / denom, logits


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 241, 10_000])
def test_matches_reference_loss_and_grads(chunk_size):
    hidden, weight, bias, labels = _data()
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=chunk_size)
    ref, _ = _reference(hidden, weight, bias, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(loss, (hidden, weight, bias)), _grads(ref, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert int(stats["num_tokens"]) == int((labels != -100).sum())


def test_no_bias_and_grad_output_scaling():
    hidden, weight, _, labels = _data(bias=False)
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=50)
    ref, _ = _reference(hidden, weight, None, labels)
    # A non-unit upstream gradient (e.g. gradient accumulation scaling) must be applied in backward.
    for got, want in zip(_grads(3.5 * loss, (hidden, weight)), _grads(3.5 * ref, (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_items", [1234, torch.tensor(77)])
def test_num_items_in_batch(num_items):
    hidden, weight, bias, labels = _data()
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=num_items)
    ref, _ = _reference(hidden, weight, bias, labels, denom=float(num_items))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(loss, (hidden, weight, bias)), _grads(ref, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # nll_sum does not depend on the denominator
    torch.testing.assert_close(stats["nll_sum"], ref.detach() * float(num_items), rtol=1e-5, atol=1e-3)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, bias, labels = _data()
    labels = torch.full_like(labels, -100)
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
    assert loss.requires_grad
    assert float(loss.detach()) == 0.0
    loss.backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0
    assert int(stats["num_tokens"]) == 0 and int(stats["num_correct"]) == 0
    # Also with an explicit zero item count (all-ignored global batch): no NaN.
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=0)
    assert float(loss.detach()) == 0.0


def test_frozen_weight_and_frozen_hidden():
    hidden, weight, bias, labels = _data()
    ref, _ = _reference(hidden, weight, bias, labels)
    ref_gh, ref_gw, _ = _grads(ref, (hidden, weight, bias))

    weight_frozen = weight.detach()
    loss, _ = fused_linear_cross_entropy(hidden, weight_frozen, labels, bias=bias.detach())
    loss.backward()
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-4, atol=1e-6)
    assert weight_frozen.grad is None

    hidden_frozen = hidden.detach()
    loss, _ = fused_linear_cross_entropy(hidden_frozen, weight, labels, chunk_size=33)
    (gw,) = torch.autograd.grad(loss, [weight])
    torch.testing.assert_close(gw, _grads(_reference(hidden_frozen, weight, None, labels)[0], (weight,))[0])
    del ref_gw


def test_no_grad_mode_same_loss_and_stats():
    hidden, weight, bias, labels = _data()
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=17)
    with torch.no_grad():
        loss_ng, stats_ng = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=17)
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach())
    for k in stats:
        torch.testing.assert_close(stats_ng[k], stats[k])


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_inputs(autocast):
    hidden, weight, bias, labels = _data(dtype=torch.bfloat16)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=64)
    gh, gw, gb = _grads(loss, (hidden, weight, bias))
    assert loss.dtype == torch.float32
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16
    ref, _ = _reference(hidden, weight, bias, labels)  # fp32 math on the bf16 values
    rh, rw, rb = _grads(ref, (hidden, weight, bias))
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    for got, want in ((gh, rh), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-4)


def test_mixed_dtypes_fp32_weight_bf16_hidden():
    hidden, weight, _, labels = _data(bias=False)
    hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
    loss, _ = fused_linear_cross_entropy(hidden_bf16, weight, labels)
    gh, gw = _grads(loss, (hidden_bf16, weight))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    ref, _ = _reference(hidden_bf16, weight, None, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_top1_stats():
    hidden, weight, bias, labels = _data()
    # Make a known subset of the targets the argmax.
    with torch.no_grad():
        logits = hidden @ weight.t() + bias
        argmax = logits.argmax(dim=1)
    labels = labels.clone()
    labels[10:60] = argmax[10:60]
    labels[::5] = -100
    _, stats = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=13)
    valid = labels != -100
    assert int(stats["num_correct"]) == int((argmax[valid] == labels[valid]).sum())
    assert int(stats["num_correct"]) >= 40


def test_top1_ties_follow_argmax():
    # All-zero weights: every logit ties, argmax is column 0; only label 0 counts as correct.
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.zeros(50, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 5] * 4)
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    assert int(stats["num_correct"]) == 8
    torch.testing.assert_close(loss, torch.tensor(torch.log(torch.tensor(50.0)).item()))


def test_rejects_out_of_range_labels():
    hidden, weight, _, labels = _data(bias=False)
    labels = labels.clone()
    labels[1] = V
    with pytest.raises(IndexError):
        fused_linear_cross_entropy(hidden, weight, labels)


def test_default_chunk_size():
    assert default_chunk_size(151_936) * 151_936 * 4 <= 256 * 2**20
    assert default_chunk_size(151_936) >= 128
    assert default_chunk_size(10**9) == 16


# ---------------------------------------------------------------------------------------------------------------------
# causal_lm_loss on a tiny Qwen2
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    model = Qwen2ForCausalLM(config).eval()  # eval: no dropout, deterministic
    return model


def _param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_causal_lm_loss_matches_model_loss(tiny_qwen2):
    model = tiny_qwen2
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (2, 24), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100  # a "prompt"

    model.zero_grad()
    ref = model(input_ids=input_ids, labels=labels).loss
    ref.backward()
    ref_grads = _param_grads(model)

    model.zero_grad()
    loss, stats = causal_lm_loss(model, {"input_ids": input_ids, "labels": labels}, chunk_size=10)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(_param_grads(model), ref_grads)
    assert int(stats["num_tokens"]) == int((labels[:, 1:] != -100).sum())

    # num_items_in_batch follows the transformers convention (sum / num_items)
    model.zero_grad()
    ref = model(input_ids=input_ids, labels=labels, num_items_in_batch=100).loss
    loss, _ = causal_lm_loss(model, {"input_ids": input_ids, "labels": labels}, num_items_in_batch=100)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)


def test_causal_lm_loss_with_padding(tiny_qwen2):
    model = tiny_qwen2
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 300, (3, 20), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 14:] = 0
    attention_mask[2, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    model.zero_grad()
    ref = model(**batch).loss
    ref.backward()
    ref_grads = _param_grads(model)

    model.zero_grad()
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(_param_grads(model), ref_grads)


def _packed_batch(seqs):
    """What TRL's DataCollatorForLanguageModeling(padding_free=True) produces for label-less examples."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return collator([{"input_ids": s.tolist()} for s in seqs])


def test_causal_lm_loss_packed_padding_free(tiny_qwen2):
    model = tiny_qwen2
    g = torch.Generator().manual_seed(3)
    seq_a = torch.randint(0, 300, (13,), generator=g)
    seq_b = torch.randint(0, 300, (9,), generator=g)

    # Reference: the two sequences run separately, token losses summed, divided by the total token count.
    model.zero_grad()
    total, count = 0.0, 0
    for s in (seq_a, seq_b):
        out = model(input_ids=s[None], labels=s[None], num_items_in_batch=1)
        total = total + out.loss  # summed loss of this sequence
        count += s.numel() - 1
    ref = total / count
    ref.backward()
    ref_grads = _param_grads(model)

    packed = _packed_batch([seq_a, seq_b])
    assert packed["position_ids"].tolist() == [list(range(13)) + list(range(9))]
    model.zero_grad()
    loss, stats = causal_lm_loss(model, packed)
    loss.backward()
    assert int(stats["num_tokens"]) == count
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(_param_grads(model), ref_grads)

    # A hand-packed batch whose labels do NOT mask the document starts: the boundary prediction (last token of A ->
    # first token of B) must still be excluded, via position_ids.
    handmade = {
        "input_ids": torch.cat([seq_a, seq_b])[None],
        "labels": torch.cat([seq_a, seq_b])[None],
        "position_ids": packed["position_ids"],
    }
    model.zero_grad()
    loss2, stats2 = causal_lm_loss(model, handmade)
    assert int(stats2["num_tokens"]) == count
    torch.testing.assert_close(loss2, ref.detach(), rtol=1e-5, atol=1e-5)


def test_causal_lm_loss_shift_labels(tiny_qwen2):
    model = tiny_qwen2
    g = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, 300, (2, 16), generator=g)
    labels = input_ids.clone()
    shift_labels = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        ref = model(input_ids=input_ids, labels=labels).loss
        loss, _ = causal_lm_loss(model, {"input_ids": input_ids, "shift_labels": shift_labels})
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_causal_lm_loss_peft_lora(tiny_qwen2):
    peft = pytest.importorskip("peft")
    import copy

    base = copy.deepcopy(tiny_qwen2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 300, (2, 12), generator=g)
    batch = {"input_ids": input_ids, "labels": input_ids}

    model.zero_grad()
    ref = model(**batch).loss
    ref.backward()
    ref_grads = _param_grads(model)
    assert ref_grads and all("lora" in n for n in ref_grads)

    model.zero_grad()
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_close(_param_grads(model), ref_grads)


def test_fused_forward_runs_inside_the_wrapper(tiny_qwen2):
    """`install_fused_loss_forward`: the wrapped model's forward (DDP's, FSDP's hooks) runs and returns the
    model's own loss and gradients; without the flag the model is unchanged (logits)."""
    import copy

    from qwen_align.losses import install_fused_loss_forward

    peft = pytest.importorskip("peft")

    class Wrapper(torch.nn.Module):  # the shape of DDP: the model as `.module`, its forward calls it
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 300, (2, 16), generator=g)
    batch = {"input_ids": input_ids, "labels": input_ids}
    plain = copy.deepcopy(tiny_qwen2)
    lora = peft.get_peft_model(copy.deepcopy(tiny_qwen2),
                               peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    for model in (plain, lora):
        model.zero_grad()
        ref = model(**batch).loss
        ref.backward()
        ref_grads = _param_grads(model)
        install_fused_loss_forward(model, chunk_size=8)
        wrapped = Wrapper(model)
        model.zero_grad()
        out = wrapped(**batch, fused_loss=True, num_items_in_batch=None)
        out.loss.backward()
        assert wrapped.calls == 1 and getattr(out, "logits", None) is None
        torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=1e-5)
        _assert_grads_close(_param_grads(model), ref_grads)
        assert int(out.num_tokens) == 2 * 15
        assert wrapped(input_ids=input_ids).logits.shape == (2, 16, 300)


def test_liger_glue_with_fake_kernel():
    """The CUDA/Liger branch cannot run here; check its argument/return handling against a stand-in kernel."""
    from dataclasses import dataclass

    from qwen_align.losses import _liger_loss

    @dataclass
    class Out:
        loss: torch.Tensor
        z_loss: torch.Tensor | None = None
        token_accuracy: torch.Tensor | None = None

    calls = {}

    def fake_flce(  # the signature of liger_kernel.transformers.functional.liger_fused_linear_cross_entropy
        input,
        weight,
        target,
        bias=None,
        ce_weight=None,
        ignore_index=-100,
        lse_square_scale=0.0,
        label_smoothing=0.0,
        reduction="mean",
        softcap=None,
        return_z_loss=False,
        accum_dtype=None,
        use_token_scaling=False,
        return_token_accuracy=False,
    ):
        calls.update(n=input.shape[0], reduction=reduction, acc=return_token_accuracy, accum_dtype=accum_dtype)
        logits = input @ weight.t() + (0 if bias is None else bias)
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
        valid = target != ignore_index
        acc = (logits.argmax(1) == target)[valid].float().mean()
        return Out(loss=loss, token_accuracy=acc) if return_token_accuracy else loss

    hidden, weight, bias, labels = _data()
    loss, stats = _liger_loss(fake_flce, hidden, weight, bias, labels, -100, None)
    ours, our_stats = fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
    assert calls == {"n": int((labels != -100).sum()), "reduction": "sum", "acc": True, "accum_dtype": torch.float32}
    torch.testing.assert_close(loss, ours, rtol=1e-5, atol=1e-5)
    assert int(stats["num_tokens"]) == int(our_stats["num_tokens"])
    assert int(stats["num_correct"]) == int(our_stats["num_correct"])
    for got, want in zip(_grads(loss, (hidden, weight, bias)), _grads(ours, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_lora_on_lm_head_is_rejected(tiny_qwen2):
    peft = pytest.importorskip("peft")
    import copy

    model = peft.get_peft_model(copy.deepcopy(tiny_qwen2), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    ids = torch.randint(0, 300, (1, 8))
    with pytest.raises(NotImplementedError, match="LM head"):
        causal_lm_loss(model, {"input_ids": ids, "labels": ids})
