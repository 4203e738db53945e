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
    """`merging`: None (plain AdamW from the Trainer) or {"variant", "base", "base_load_kwargs", "reserve_rate",
    "merge_alpha", "rescale", "merge_every"}; `base` is the checkpoint τ_r = start − base is taken against.

    FSDP2: the Trainer creates the optimizer on the unsharded model and accelerate then swaps in the DTensor
    parameters (same names); the optimizer builds τ_r at its first step, so from this rank's shard only."""

    def __init__(self, *args, merging: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.merging = merging
        self.merging_optimizer = None
        if merging is not None:
            refuse_unsupported_sharding(self)

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
            m["base"],
            base_load_kwargs=m.get("base_load_kwargs"),
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

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Full state first: under FSDP2 accelerate loads through torch.distributed.checkpoint, which would
        # otherwise initialise the state with a zero-gradient step (moving the weights by α·F(τ_r)).
        if checkpoint is not None and self.merging_optimizer is not None:
            self.merging_optimizer.initialize_state()
        super()._load_optimizer_and_scheduler(checkpoint)

    @torch.no_grad()
    def sequence_logps(self, model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of chosen and rejected completions of a prepared dataset, in order, under `model`
        as it is (a LoRA policy with its adapter on)."""
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator,
                            shuffle=False)
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        # compute_ref_log_probs switches a peft model's adapter off when there is no ref_model; a ref_model set
        # for the duration keeps it on (the forward pass uses the `model` given).
        ref_model = self.ref_model
        if ref_model is None:
            self.ref_model = model
        try:
            for batch in loader:
                batch = {k: v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                c, r = self.compute_ref_log_probs(model, batch)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        finally:
            model.train(was_training)
            self.ref_model = ref_model
        return torch.cat(chosen), torch.cat(rejected)


def refuse_unsupported_sharding(trainer) -> None:
    """DDP and FSDP2 are exact; DeepSpeed and FSDP1 hand the optimizer flattened storage, refused in one line."""
    if trainer.is_deepspeed_enabled:
        raise UserError(
            "online merging: DeepSpeed (ZeRO 1-3) is not supported — its optimizer wrapper steps one flattened fp32 "
            "partition per param group, cut across tensor boundaries and without names, while OnTIES's top-p is per "
            "whole tensor and τ_r and OnDARE's masks are per named tensor; use FSDP2 (fsdp_version: 2) or DDP"
        )
    if trainer.is_fsdp_enabled and getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise UserError(
            "online merging: FSDP1 is not supported — it flattens each wrapped module's tensors into one "
            "FlatParameter sharded across tensor boundaries, so per-tensor top-p and names are lost; use "
            "FSDP2 (fsdp_version: 2) or DDP"
        )


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

