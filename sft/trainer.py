"""TRL's SFTTrainer with one hook changed: the loss comes from the chunked fused linear+cross-entropy,
which computes the LM-head gradient while it computes the loss and so never keeps [tokens, vocab] logits.

The fused loss runs inside the model's own forward (replaced per instance), and `compute_loss` calls the
model as the Trainer prepared it, so a DDP / FSDP wrapper's forward runs and gradients are synchronised."""

from __future__ import annotations

import torch
from trl import SFTTrainer

from qwen_align.checkpoints.resume import AtomicCheckpoints
from qwen_align.losses import install_fused_loss_forward


class FusedLossSFTTrainer(AtomicCheckpoints, SFTTrainer):
    def __init__(self, *args, loss_chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk_size = loss_chunk_size
        install_fused_loss_forward(self.model, loss_chunk_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # callers that want logits get TRL's own path
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        # accelerate autocasts by wrapping the forward it was given; enter it here too, whatever wraps the model.
        with self.accelerator.autocast():
            out = model(**inputs, fused_loss=True, num_items_in_batch=num_items_in_batch)
        loss = out.loss
        # As in Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        num_valid = self.accelerator.gather_for_metrics(out.num_tokens.detach().reshape(1)).sum()
        num_correct = self.accelerator.gather_for_metrics(out.num_correct.detach().reshape(1)).sum()
        accuracy = (num_correct / num_valid).item() if num_valid > 0 else 0.0
        if accuracy == accuracy:  # NaN when the kernel (an old Liger) does not report top-1 counts
            self._metrics[mode]["mean_token_accuracy"].append(accuracy)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local.reshape(1)).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss
