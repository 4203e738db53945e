"""Packed SFT rows give each document the logits and loss it gets alone, on eager, sdpa and flex attention.

The batch is the one TRL's bfd packing hands the trainer (one row, per-document position_ids, no attention mask),
run through the model as our fused loss and TRL's compute_loss run it."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import SFTConfig, SFTTrainer

from qwen_align.errors import UserError
from sft.packing import check_document_masking, packing_cost_note
from sft.trainer import FusedLossSFTTrainer

LENGTHS = (9, 17, 6)  # three documents, packed into one row of 32


def tiny_model(attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config)


def documents() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in LENGTHS]


def packed_batch(trainer_cls, model, tokenizer, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), max_length=32, packing=True, packing_strategy="bfd",
                     assistant_only_loss=False, report_to="none", per_device_train_batch_size=8, use_cpu=True,
                     dataloader_pin_memory=False, bf16=False)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": documents()}),
                          processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def separate_loss(model, docs) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the documents run one by one, and the number of predicted tokens."""
    total, count = torch.zeros(()), 0
    for doc in docs:
        ids = torch.tensor([doc])
        logits = model(input_ids=ids, use_cache=False).logits
        total = total + torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        count += len(doc) - 1
    return total, count


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_packed_row_matches_documents_run_alone(attn, demo_tokenizer, tmp_path):
    model = tiny_model(attn)
    trainer, batch = packed_batch(FusedLossSFTTrainer, model, demo_tokenizer, tmp_path)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # all three in one padding-free row
    order = [n for n in torch.diff(torch.nonzero(batch["position_ids"][0] == 0).flatten(),
                                   append=torch.tensor([batch["input_ids"].shape[1]])).tolist()]
    assert sorted(order) == sorted(LENGTHS)
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for n in order:
            doc = batch["input_ids"][:, start : start + n]
            alone = model(input_ids=doc, use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        # The control: the same row with a plain causal mask (an all-ones attention mask) lets the later
        # documents see the earlier ones, so this comparison can fail.
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                      use_cache=False).logits[0]
        assert (leaky[order[0]:] - packed[order[0]:]).abs().max() > 1e-3

        total, count = separate_loss(model, [batch["input_ids"][0, s : s + n].tolist()
                                             for s, n in zip([0, order[0], order[0] + order[1]], order)])
        ours = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(count))
        torch.testing.assert_close(ours, total / count, atol=1e-5, rtol=1e-5)


def test_trl_default_loss_on_a_packed_row(demo_tokenizer, tmp_path):
    model = tiny_model("sdpa")
    trainer, batch = packed_batch(SFTTrainer, model, demo_tokenizer, tmp_path)
    model.eval()
    with torch.no_grad():
        docs = []
        starts = torch.nonzero(batch["position_ids"][0] == 0).flatten().tolist() + [batch["input_ids"].shape[1]]
        for a, b in zip(starts, starts[1:]):
            docs.append(batch["input_ids"][0, a:b].tolist())
        total, count = separate_loss(model, docs)
        trl_loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(count))
    torch.testing.assert_close(trl_loss, total / count, atol=1e-5, rtol=1e-5)


def test_packing_notes_and_guard(monkeypatch):
    assert packing_cost_note("flex_attention") is None and packing_cost_note("flash_attention_2") is None
    assert "flex_attention" in packing_cost_note("sdpa")
    check_document_masking("sdpa")  # this transformers builds per-document masks
    import transformers.masking_utils as mu

    monkeypatch.delattr(mu, "find_packed_sequence_indices")
    with pytest.raises(UserError, match="packed documents would attend to each other"):
        check_document_masking("sdpa")
    check_document_masking("flash_attention_2")  # flash-attention reads the boundaries itself


def test_sft_stage_packs_and_says_what_dense_masks_cost(small_sft_recipe, caplog):
    import logging

    from qwen_align.recipe import validate_recipe
    from qwen_align.runner import run_recipe

    _, raw = small_sft_recipe
    stage = raw["stages"][0]
    stage.update(packing=True, max_length=256, max_steps=1, attn_implementation="sdpa")
    stage.pop("task_eval")
    with caplog.at_level(logging.WARNING, logger="sft.stage"):
        manifest = run_recipe(validate_recipe(raw, "recipe.yaml"))
    entry = manifest["stages"]["sft"]
    assert entry["status"] == "completed" and entry["metrics"]["train_steps"] == 1
    assert any("attn_implementation: flex_attention" in r.getMessage() for r in caplog.records)
