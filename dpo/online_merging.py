"""Online Merging Optimizers (Lu et al. 2024, "Online Merging Optimizers for Boosting Rewards and Mitigating
Tax in Alignment", arXiv:2405.17931): Adam whose every update is merged with the SFT delta.

    τ_r = θ_r − θ_b       the reference (SFT) model minus the base (pre-trained) model; fixed, kept as state
    Δθ  = −η·m̂/(√v̂+ε)    the ordinary bias-corrected Adam update
    OnDARE:  θ ← θ + (1−α)·F(Δθ) + α·F(τ_r)     F keeps each entry with probability p (random drop)
    OnTIES:  θ ← θ + (a ⊕ b),  a = (1−α)·F(Δθ), b = α·F(τ_r)
             F keeps the top-p fraction by magnitude; ⊕ adds where signs agree, else keeps the larger magnitude

Decoupled weight decay is applied first, as torch.optim.AdamW does (θ ← θ − η·λ·θ), and is never merged.
`merge_every=K > 1` is the paper's step-K variant: K−1 plain Adam steps whose updates are accumulated, and at
every K-th step the accumulated delta is rolled back and replaced by its merged form.

Memory: AdamW's two moments plus τ_r (one tensor per parameter, in the parameter's dtype); `merge_every > 1`
adds a float32 accumulator per parameter. Arithmetic is done in float32 whatever the parameter dtype.
OnDARE's masks come from the optimizer's own torch.Generator (one per device), saved in `state_dict`, so a
resumed run draws the same masks; with the same seed on every rank, data-parallel replicas stay identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from qwen_align.errors import UserError

# Defaults from the paper: best DPO runs used p ≈ 0.01 and α ≈ 1e-7; p stays robust down to 5e-4; α = 1e-4
# collapses training while 5e-6…1e-7 work, so an α search starts near 1e-7.
DEFAULT_RESERVE_RATE = 0.01
DEFAULT_MERGE_ALPHA = 1e-7

# A policy with untied embeddings may face a base checkpoint whose LM head is tied to its embeddings.
TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
_FP32_STATE = ("merge_accum",)  # state kept in float32 (torch casts optimizer state to the param dtype on load)


def _clean_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def load_base_state(base: Mapping[str, torch.Tensor] | str | Path, **load_kwargs) -> dict[str, torch.Tensor]:
    """A base checkpoint as name -> tensor: a state dict as is, or a path/preset through `load_model`
    (`load_kwargs`: tokenizer, seed, ... — a preset is a seeded random init)."""
    if isinstance(base, Mapping):
        return dict(base)
    from qwen_align.model import load_model

    model = load_model(str(base), "policy", **load_kwargs)
    return {name: t.detach() for name, t in model.state_dict().items()}


def compute_sft_delta(
    named_params: Iterable[tuple[str, torch.Tensor]], base: Mapping[str, torch.Tensor] | str | Path, **load_kwargs
) -> dict[str, torch.Tensor]:
    """τ_r = current params − base params, by name (on CPU, in each param's dtype). Names missing from the base
    or with another shape stop with one UserError that lists them."""
    base_state = load_base_state(base, **load_kwargs)
    delta, missing, mismatched = {}, [], []
    for raw_name, p in named_params:
        name = _clean_name(raw_name)
        if "lora_" in name:
            raise UserError(
                f"online merging: parameter '{name}' is a LoRA adapter weight, which has no SFT delta "
                "(τ_r = SFT − base exists only for full weights); use `optimizer: adamw` with LoRA, or train without LoRA"
            )
        b = base_state.get(name)
        if b is None and name in TIED_ALIASES:
            b = base_state.get(TIED_ALIASES[name])
        if b is None:
            missing.append(name)
        elif tuple(b.shape) != tuple(p.shape):
            mismatched.append(f"{name} {tuple(p.shape)} vs base {tuple(b.shape)}")
        else:
            delta[raw_name] = p.detach().to("cpu", torch.float32).sub(b.to("cpu", torch.float32)).to(p.dtype)
    if missing:
        raise UserError(
            f"online merging: the base checkpoint has no weights for {len(missing)} policy parameters "
            f"(e.g. {', '.join(missing[:3])}); `base_model` must be the model the SFT stage started from"
        )
    if mismatched:
        raise UserError(
            f"online merging: {len(mismatched)} policy parameters differ in shape from the base checkpoint "
            f"(e.g. {'; '.join(mismatched[:3])}); `base_model` must be the model the SFT stage started from"
        )
    return delta


# ---------------------------------------------------------------- sparsifiers and merges (float32 tensors)


def top_fraction_mask(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask keeping exactly ceil(fraction·n) entries of largest |x| (at least one); ties at the
    threshold are broken by position (first in flattened order). kthvalue finds the threshold without a sort."""
    flat = x.detach().abs().flatten()
    n = flat.numel()
    k = min(n, max(1, math.ceil(fraction * n)))
    if k == n:
        return torch.ones_like(x, dtype=torch.bool)
    threshold = flat.kthvalue(n - k + 1).values  # the k-th largest magnitude
    keep = flat > threshold
    at_threshold = flat == threshold
    need = k - int(keep.sum())
    keep |= at_threshold & (at_threshold.cumsum(0) <= need)
    return keep.view_as(x)


def random_mask(x: torch.Tensor, keep: float, generator: torch.Generator) -> torch.Tensor:
    if keep >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    return torch.rand(x.shape, generator=generator, device=x.device) < keep


def sign_consensus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ⊕ b: a + b where the signs agree; otherwise whichever has the larger magnitude (a on a tie)."""
    agree = torch.sign(a) == torch.sign(b)
    larger = torch.where(a.abs() >= b.abs(), a, b)
    return torch.where(agree, a + b, larger)


# ---------------------------------------------------------------- optimizers


class OnlineMergingOptimizer(torch.optim.Optimizer):
    """AdamW whose update is merged with the SFT delta τ_r; subclasses define `merge`.

    params: (name, param) pairs, or param groups whose "params" are (name, param) pairs (per-group options:
    lr, betas, eps, weight_decay, reserve_rate, merge_alpha). Give the base checkpoint as `base` (a state dict,
    or a path/preset loaded with `load_model(base, "policy", **base_load_kwargs)`; τ_r = current params − base),
    or τ_r itself as `sft_delta` (name -> tensor, e.g. from `compute_sft_delta()` before the weights changed).
    """

    variant = "base"

    def __init__(
        self,
        params: Iterable[Any],
        base: Mapping[str, torch.Tensor] | str | Path | None = None,
        *,
        sft_delta: Mapping[str, torch.Tensor] | None = None,
        lr: float = 7e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reserve_rate: float = DEFAULT_RESERVE_RATE,
        merge_alpha: float = DEFAULT_MERGE_ALPHA,
        rescale: bool = False,
        merge_every: int = 1,
        seed: int = 0,
        base_load_kwargs: dict[str, Any] | None = None,
    ):
        if not 0 < reserve_rate <= 1:
            raise UserError(f"online merging: reserve_rate must be in (0, 1], got {reserve_rate}")
        if not 0 <= merge_alpha <= 1:
            raise UserError(f"online merging: merge_alpha must be in [0, 1], got {merge_alpha}")
        if merge_every < 1:
            raise UserError(f"online merging: merge_every must be >= 1, got {merge_every}")
        if (base is None) == (sft_delta is None):
            raise UserError("online merging: give exactly one of `base` (base checkpoint) or `sft_delta` (τ_r)")
        groups = _named_groups(params)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, reserve_rate=reserve_rate,
                        merge_alpha=merge_alpha)
        super().__init__(groups, defaults)
        self.rescale = rescale
        self.merge_every = merge_every
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        named = [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])]
        if sft_delta is None:
            sft_delta = compute_sft_delta(named, base, **(base_load_kwargs or {}))
        for name, p in named:
            tau = sft_delta.get(name, sft_delta.get(_clean_name(name)))
            if tau is None:
                raise UserError(f"online merging: no SFT delta for parameter '{name}'")
            if tuple(tau.shape) != tuple(p.shape):
                raise UserError(f"online merging: SFT delta for '{name}' has shape {tuple(tau.shape)}, param {tuple(p.shape)}")
            self.state[p]["sft_delta"] = tau.detach().to(p.device, p.dtype).clone()

    # -- the merge ---------------------------------------------------------

    def merge(self, update: torch.Tensor, tau: torch.Tensor, group: dict) -> torch.Tensor:
        raise NotImplementedError

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]

    # -- the step ------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("online merging optimizers do not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if self.merge_every > 1:
                        state["merge_accum"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = int(state["step"].item())
                grad = p.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # Moments in the param dtype (as torch AdamW keeps them), arithmetic in float32.
                m = exp_avg.float().lerp_(grad, 1 - beta1)
                v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.copy_(m)
                exp_avg_sq.copy_(v)
                bias1 = 1 - beta1**step
                bias2_sqrt = math.sqrt(1 - beta2**step)
                update = m.div((v.sqrt() / bias2_sqrt).add_(eps)).mul_(-lr / bias1)

                theta = p.float()
                if wd != 0:
                    theta.mul_(1 - lr * wd)
                if self.merge_every == 1:
                    theta.add_(self.merge(update, state["sft_delta"].float(), group))
                else:
                    accum = state["merge_accum"]
                    if step % self.merge_every:
                        theta.add_(update)  # a plain Adam step, remembered
                        accum.add_(update)
                    else:  # roll the accumulated steps back, apply the merged total
                        total = accum.add_(update)
                        theta.sub_(total - update).add_(self.merge(total, state["sft_delta"].float(), group))
                        accum.zero_()
                p.copy_(theta)
        return loss

    # -- state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["online_merging"] = {
            "variant": self.variant,
            "merge_every": self.merge_every,
            "rescale": self.rescale,
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("online_merging", None)
        if extra is None:
            raise UserError("online merging: the optimizer state has no online-merging section (saved by another optimizer?)")
        if extra["variant"] != self.variant or extra["merge_every"] != self.merge_every:
            raise UserError(
                f"online merging: the saved state is {extra['variant']} with merge_every={extra['merge_every']}, "
                f"this optimizer is {self.variant} with merge_every={self.merge_every}"
            )
        # torch casts floating state to the param dtype on load; keep float32 accumulators float32.
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        fp32 = {}
        inner = {}
        for pid, s in state_dict["state"].items():
            inner[pid] = {k: v for k, v in s.items() if k not in _FP32_STATE}
            fp32[pid] = {k: v for k, v in s.items() if k in _FP32_STATE}
        state_dict["state"] = inner
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            for k, v in fp32.get(pid, {}).items():
                self.state[p][k] = v.to(p.device, torch.float32).clone()
        self.rescale, self.seed = extra["rescale"], extra["seed"]
        self._generators = {}
        for key, rng_state in extra["generators"].items():
            g = torch.Generator(device=key)
            g.set_state(rng_state.cpu() if hasattr(rng_state, "cpu") else rng_state)
            self._generators[key] = g

    def settings(self) -> dict[str, Any]:
        """What the manifest records about this optimizer."""
        g = self.param_groups[0]
        return {"variant": self.variant, "reserve_rate": g["reserve_rate"], "merge_alpha": g["merge_alpha"],
                "rescale": self.rescale, "merge_every": self.merge_every, "seed": self.seed}


class OnDARE(OnlineMergingOptimizer):
    """θ ← θ + (1−α)·F(Δθ) + α·F(τ_r), F = independent random keep with probability p (`reserve_rate`).
    No 1/p rescaling unless `rescale=True` (the paper: rescaling hurts stability over many steps).
    α = 0 is gradient dropout (ChildTuning); p = 1, α = 0 is exactly AdamW."""

    variant = "ondare"

    def merge(self, update, tau, group):
        p, alpha = group["reserve_rate"], group["merge_alpha"]
        g = self.generator(update.device)
        merged = update.mul_(random_mask(update, p, g)).mul_(1 - alpha)
        if alpha:
            merged.add_(tau * random_mask(tau, p, g), alpha=alpha)
        if self.rescale and p < 1:
            merged.div_(p)
        return merged


class OnTIES(OnlineMergingOptimizer):
    """θ ← θ + (a ⊕ b), a = (1−α)·F(Δθ), b = α·F(τ_r), F = keep the top-p fraction by magnitude (per tensor),
    ⊕ = sign consensus. Deterministic: no random numbers."""

    variant = "onties"

    def merge(self, update, tau, group):
        p, alpha = group["reserve_rate"], group["merge_alpha"]
        a = update.mul_(top_fraction_mask(update, p)).mul_(1 - alpha)
        if not alpha:
            return a
        b = tau.mul(top_fraction_mask(tau, p)).mul_(alpha)
        return sign_consensus(a, b)


OPTIMIZERS = {"ondare": OnDARE, "onties": OnTIES}


def _named_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Normalise (name, param) pairs or groups of them into torch's named param groups (trainable only)."""
    params = list(params)
    if not params:
        raise UserError("online merging: no parameters to optimise")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        pairs = list(group["params"])
        if pairs and not isinstance(pairs[0], tuple):
            raise UserError("online merging: parameters must come with their names, e.g. model.named_parameters()")
        pairs = [(n, p) for n, p in pairs if p.requires_grad]
        if pairs:
            out.append({**group, "params": pairs})
    return out
