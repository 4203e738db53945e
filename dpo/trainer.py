"""TRL's DPOTrainer with the optimizer hook changed: `create_optimizer` builds an online merging optimizer
(OnDARE / OnTIES) with the Trainer's own weight-decay grouping, so the LR scheduler, gradient accumulation,
clipping and checkpoint resume (optimizer state incl. τ_r and the mask RNG) all work as for AdamW."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader
from trl import DPOTrainer

from qwen_align.checkpoints.resume import AtomicCheckpoints
from qwen_align.errors import UserError

from .online_merging import OPTIMIZERS


class OnlineMergingDPOTrainer(AtomicCheckpoints, DPOTrainer):
    """`merging`: None (plain AdamW from the Trainer) or {"variant", "sft_delta", "reserve_rate",
    "merge_alpha", "rescale", "merge_every"}; `sft_delta` (name -> τ_r) is dropped once the optimizer holds it."""

    def __init__(self, *args, merging: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.merging = merging
        self.merging_optimizer = None
        if merging is not None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise UserError(
                "online merging: sharded training (DeepSpeed ZeRO / FSDP) is not supported — the optimizer needs "
                "whole parameters to sparsify each update; use data parallelism (DDP), or `optimizer: adamw`"
            )

    def create_optimizer(self, model=None):
        if self.merging is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        m = self.merging
        cls = OPTIMIZERS[m["variant"]]
        self.optimizer = cls(
            [g for g in groups if g["params"]],
            sft_delta=m.pop("sft_delta"),
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            reserve_rate=m["reserve_rate"],
            merge_alpha=m["merge_alpha"],
            rescale=m["rescale"],
            merge_every=m["merge_every"],
            seed=self.args.seed,  # the same on every rank: data-parallel replicas draw the same masks
        )
        self.merging_optimizer = self.optimizer  # accelerate wraps self.optimizer later
        return self.optimizer

    @torch.no_grad()
    def sequence_logps(self, model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of chosen and rejected completions of a prepared dataset, in order."""
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator,
                            shuffle=False)
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        try:
            for batch in loader:
                batch = {k: v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                c, r = self.compute_ref_log_probs(model, batch)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(chosen), torch.cat(rejected)


def pair_metrics(
    policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor], beta: float
) -> dict[str, float]:
    """Held-out pair metrics. `pair_accuracy`: implicit reward β·log(π/π_ref) higher for chosen (ties count
    half, so it is 0.5 before training); `logp_accuracy`: the policy alone gives chosen the higher log-prob."""
    pc, pr = policy
    rc, rr = reference
    margin = beta * ((pc - rc) - (pr - rr))
    return {
        "pair_accuracy": float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()),
        "reward_margin": float(margin.mean()),
        "logp_accuracy": float(((pc > pr).float() + 0.5 * (pc == pr).float()).mean()),
        "chosen_logp": float(pc.mean()),
        "pairs": int(pc.numel()),
    }

