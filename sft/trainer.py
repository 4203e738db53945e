"""TRL's SFTTrainer with one hook changed: the loss comes from the chunked fused linear+cross-entropy,
which computes the LM-head gradient while it computes the loss and so never keeps [tokens, vocab] logits."""

from __future__ import annotations

import torch
from trl import SFTTrainer

from qwen_align.checkpoints.resume import AtomicCheckpoints
from qwen_align.losses import causal_lm_loss


class FusedLossSFTTrainer(AtomicCheckpoints, SFTTrainer):
    def __init__(self, *args, loss_chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk_size = loss_chunk_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # callers that want logits get TRL's own path
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        # accelerate autocasts by patching the model's forward, which the fused loss does not call.
        with self.accelerator.autocast():
            loss, stats = causal_lm_loss(model, inputs, num_items_in_batch=num_items_in_batch,
                                         chunk_size=self.loss_chunk_size)
        # As in Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        num_valid = self.accelerator.gather_for_metrics(stats["num_tokens"].detach().reshape(1)).sum()
        num_correct = self.accelerator.gather_for_metrics(stats["num_correct"].detach().reshape(1)).sum()
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
