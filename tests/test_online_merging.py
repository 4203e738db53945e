"""Online merging optimizers: AdamW equivalence, the merges, the sparsifiers, state round trips, step-K."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dpo.config import TRL_LOSS_TYPES, Config
from dpo.online_merging import OnDARE, OnTIES, compute_sft_delta, sign_consensus, top_fraction_mask, whole

PAIRS = {"sources": [{"path": "pairs.jsonl"}]}  # options-only checks: the file is never read
from qwen_align.errors import UserError


def tiny_qwen(seed: int = 0, tie: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(config)


def perturbed_base(model, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t.detach() - scale * torch.randn(t.shape, generator=g) for n, t in model.state_dict().items()}


def train_steps(model, opt, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 6), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def decay_groups(model):
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if p.dim() > 1], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named if p.dim() <= 1], "weight_decay": 0.0}]


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
def test_p1_alpha0_is_adamw(cls):
    ours, ref = tiny_qwen(), tiny_qwen()
    opt = cls(decay_groups(ours), perturbed_base(ours), lr=3e-3, reserve_rate=1.0, merge_alpha=0.0)
    adamw = torch.optim.AdamW(
        [{"params": [p for _, p in g["params"]], "weight_decay": g["weight_decay"]} for g in decay_groups(ref)],
        lr=3e-3, foreach=False,
    )
    train_steps(ours, opt, 30)
    train_steps(ref, adamw, 30)
    # atol 1e-5: k_proj.bias has a zero true gradient (softmax ignores a per-row shift), so Adam normalises
    # rounding noise there; every other tensor agrees to ~1e-7.
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert any((a - b).abs().max() > 0 for a, b in zip(ours.parameters(), tiny_qwen().parameters()))


def test_sign_consensus_by_hand():
    a = torch.tensor([1.0, -2.0, 3.0, -1.0, 0.0, 2.0, -0.5])
    b = torch.tensor([2.0, -1.0, -1.0, 4.0, -3.0, 0.0, 0.5])
    # agree -> sum; disagree -> larger magnitude; a zero disagrees with a non-zero -> the non-zero; tie -> a
    assert sign_consensus(a, b).tolist() == [3.0, -3.0, 3.0, 4.0, -3.0, 2.0, -0.5]


def test_onties_merge_by_hand():
    p = torch.nn.Parameter(torch.zeros(4))
    tau = torch.tensor([0.0, 2.0, -4.0, 1.0])
    opt = OnTIES([("w", p)], sft_delta={"w": tau}, lr=1.0, reserve_rate=0.5, merge_alpha=0.5)
    update = torch.tensor([3.0, -1.0, -2.0, 0.5])
    merged = opt.merge(update.clone(), tau.clone(), opt.param_groups[0], whole(update))
    # top-2 of update: [3, ., -2, .] * 0.5 = [1.5, 0, -1, 0]; top-2 of tau: [., 2, -4, .] * 0.5 = [0, 1, -2, 0]
    assert merged.tolist() == [1.5, 1.0, -3.0, 0.0]


def test_top_fraction_mask_exact_count_and_ties():
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, -5.0])
    assert top_fraction_mask(x, 0.5).tolist() == [True, False, True, False, False, True]
    assert top_fraction_mask(torch.ones(10), 0.3).sum() == 3  # all tied: exactly k, first ones
    assert top_fraction_mask(x, 1e-9).sum() == 1  # never empty
    y = torch.randn(37, 53)
    for frac in (0.01, 0.1, 0.5, 0.999):
        mask = top_fraction_mask(y, frac)
        k = math.ceil(frac * y.numel())
        assert mask.sum() == k
        assert y.abs()[mask].min() >= y.abs()[~mask].max()


def test_ondare_keep_rate_and_independent_masks():
    p = torch.nn.Parameter(torch.zeros(200_000))
    opt = OnDARE([("w", p)], sft_delta={"w": torch.ones(200_000)}, reserve_rate=0.1, merge_alpha=0.5, seed=3)
    merged = opt.merge(torch.ones(200_000), torch.ones(200_000), opt.param_groups[0], whole(p))
    # 0.5·mask_u + 0.5·mask_τ with independent masks: P(1) = p², P(0.5) = 2p(1−p), P(0) = (1−p)²
    for value, expected in ((1.0, 0.01), (0.5, 0.18), (0.0, 0.81)):
        share = (merged == value).float().mean().item()
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / 200_000) + 1e-4, (value, share)
    rescaled = OnDARE([("w", p)], sft_delta={"w": torch.zeros(200_000)}, reserve_rate=0.1, merge_alpha=0.0,
                      rescale=True)
    out = rescaled.merge(torch.ones(200_000), torch.zeros(200_000), rescaled.param_groups[0], whole(p))
    assert set(out.unique().tolist()) == {0.0, 10.0}


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # as the Trainer loads optimizer.pt


@pytest.mark.parametrize("cls,merge_every", [(OnDARE, 1), (OnDARE, 3), (OnTIES, 2)])
def test_save_restore_continues_identically(cls, merge_every):
    model = tiny_qwen()
    kwargs = dict(lr=1e-2, weight_decay=0.1, reserve_rate=0.3, merge_alpha=0.2, merge_every=merge_every, seed=5)
    opt = cls(model.named_parameters(), perturbed_base(model), **kwargs)
    train_steps(model, opt, 4, seed=1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), _roundtrip(opt.state_dict())
    train_steps(model, opt, 5, seed=2)

    resumed = tiny_qwen(seed=9)
    resumed.load_state_dict(saved_model)
    # A different base: the restored τ_r must win over the constructor's.
    opt2 = cls(resumed.named_parameters(), perturbed_base(resumed, seed=7), **kwargs)
    opt2.load_state_dict(saved_opt)
    train_steps(resumed, opt2, 5, seed=2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_step_k_matches_hand_computation():
    """K = 2, p = 1, α = 0.5, constant gradient c: each Adam update is u = −lr·c/(|c|+ε)."""
    c = torch.tensor([1.0, -2.0, 0.5])
    tau = torch.tensor([0.3, 0.3, -0.3])
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    lr, alpha = 0.1, 0.5
    opt = OnDARE([("w", w)], sft_delta={"w": tau}, lr=lr, reserve_rate=1.0, merge_alpha=alpha, merge_every=2)
    u = -lr * c / (c.abs() + 1e-8)
    theta0 = w.detach().clone()
    expected = [theta0 + u, theta0 + (1 - alpha) * 2 * u + alpha * tau]
    expected += [expected[1] + u, expected[1] + (1 - alpha) * 2 * u + alpha * tau]
    for want in expected:
        opt.zero_grad()
        (w * c).sum().backward()
        opt.step()
        torch.testing.assert_close(w.detach(), want, rtol=1e-6, atol=1e-6)


def test_bf16_params_keep_delta_dtype_and_fp32_accumulator():
    model = tiny_qwen().to(torch.bfloat16)
    opt = OnDARE(model.named_parameters(), perturbed_base(model), lr=1e-3, reserve_rate=0.5, merge_alpha=0.1,
                 merge_every=2)
    train_steps(model, opt, 1)
    p = next(model.parameters())
    assert opt.state[p]["sft_delta"].dtype == torch.bfloat16
    opt.load_state_dict(_roundtrip(opt.state_dict()))
    assert opt.state[p]["merge_accum"].dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
    train_steps(model, opt, 1)
    assert all(torch.isfinite(q).all() for q in model.parameters())


def test_name_and_shape_mismatches_fail_clearly():
    model = tiny_qwen()
    base = perturbed_base(model)
    missing = {k: v for k, v in base.items() if "layers.1.mlp" not in k}
    with pytest.raises(UserError, match=r"no weights for 3 policy parameters \(e\.g\. model\.layers\.1\.mlp"):
        OnDARE(model.named_parameters(), missing)
    base["model.norm.weight"] = torch.ones(7)
    with pytest.raises(UserError, match=r"differ in shape.*model\.norm\.weight \(32,\) vs base \(7,\)"):
        OnTIES(model.named_parameters(), base)


def test_untied_policy_takes_tied_base_embeddings():
    tied, untied = tiny_qwen(tie=True), tiny_qwen(tie=False)
    base = {k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    delta = compute_sft_delta(untied.named_parameters(), base)
    torch.testing.assert_close(delta["lm_head.weight"], untied.lm_head.weight - tied.model.embed_tokens.weight)
    assert "lm_head.weight" not in dict(tied.named_parameters())  # tied: one parameter, one τ_r


def test_lora_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen(), LoraConfig(r=2, target_modules=["q_proj"]))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(UserError, match="LoRA adapter weight, which has no SFT delta"):
        OnDARE(trainable, perturbed_base(tiny_qwen()))
    with pytest.raises(ValueError, match="LoRA adapters have none"):
        Config(name="dpo", kind="dpo", data=PAIRS, lora={"r": 4})
    Config(name="dpo", kind="dpo", data=PAIRS, lora={"r": 4}, optimizer="adamw")


def test_loss_types_match_installed_trl():
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", help_text)) == set(TRL_LOSS_TYPES)
    with pytest.raises(ValueError, match="unknown DPO loss type 'sigmoidd'; TRL offers: sigmoid, hinge"):
        Config(name="dpo", kind="dpo", data=PAIRS, loss_type="sigmoidd")
    cfg = Config(name="dpo", kind="dpo", data=PAIRS, loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.5], nll_weight=0.2)
    assert cfg.losses() == (["sigmoid", "bco_pair", "sft"], [1.0, 0.5, 0.2])
    assert Config(name="dpo", kind="dpo", data=PAIRS).learning_rate == 7e-7
