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
OnDARE's masks are drawn from counter-seeded generators (seed, parameter name, step), so a resumed run draws the
same masks and data-parallel replicas stay identical with no RNG state to save.

Sharded parameters (FSDP2 DTensors, sharded on dim 0): the Adam arithmetic runs on each rank's local shard,
OnDARE's masks are the local part of the whole tensor's mask and OnTIES's top-p threshold is the whole tensor's
(`merge_shards`), so a sharded run keeps exactly the entries the unsharded run keeps. τ_r is built at the first
step, after the trainer has sharded the model, from this rank's rows of the base checkpoint only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import torch

from qwen_align.errors import UserError

from .merge_shards import (
    ShardLayout, block_random_mask, layout, like_param, local, mask_from_cut, top_fraction_cut, top_fraction_mask,
)

# Defaults from the paper: best DPO runs used p ≈ 0.01 and α ≈ 1e-7; p stays robust down to 5e-4; α = 1e-4
# collapses training while 5e-6…1e-7 work, so an α search starts near 1e-7.
DEFAULT_RESERVE_RATE = 0.01
DEFAULT_MERGE_ALPHA = 1e-7

# A policy with untied embeddings may face a base checkpoint whose LM head is tied to its embeddings.
TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
_FP32_STATE = ("merge_accum",)  # state kept in float32 (torch casts optimizer state to the param dtype on load)
# Kept in every param group as well as in the state dict's own section: torch.distributed.checkpoint (FSDP2's
# optimizer checkpoints) keeps param-group entries and drops extra top-level keys.
_GROUP_SETTINGS = ("merge_variant", "merge_every", "merge_rescale", "merge_seed")


def _clean_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


# ---------------------------------------------------------------- the base checkpoint and τ_r


class _StateDictWeights:
    """A name -> tensor mapping with the reading interface of `CheckpointTensors`."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = dict(state)

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        t = self.state[name]
        return t if t.dim() == 0 else t[start:stop]


def open_base(base: Mapping[str, torch.Tensor] | str | Path, **load_kwargs):
    """The base checkpoint, readable tensor by tensor and row block by row block: a state dict as is; a folder
    with safetensors read lazily (each rank reads only its rows); anything else (a preset, a folder of .bin
    files) through `load_model(base, "policy", **load_kwargs)` as a whole model — a preset is a seeded random
    init that exists only once built, which is fine for the tiny demo/test presets it serves."""
    if isinstance(base, Mapping):
        return _StateDictWeights(base)
    from qwen_align.checkpoints.tensors import CheckpointTensors, has_safetensors

    if Path(base).is_dir() and has_safetensors(base):
        return CheckpointTensors(base)
    from qwen_align.model import load_model

    with torch.random.fork_rng(devices=[]):  # building a preset reseeds torch; keep the trainer's RNG as it was
        model = load_model(str(base), "policy", **load_kwargs)
    return _StateDictWeights({name: t.detach() for name, t in model.state_dict().items()})


def load_base_state(base: Mapping[str, torch.Tensor] | str | Path, **load_kwargs) -> dict[str, torch.Tensor]:
    """A base checkpoint as name -> whole tensor (tests and small models; training reads it row block-wise)."""
    source = open_base(base, **load_kwargs)
    if isinstance(source, _StateDictWeights):
        return source.state
    return {name: source.rows(name) for name in source.names()}


def match_base(named_params: Iterable[tuple[str, torch.Tensor]], source) -> dict[str, str]:
    """Policy parameter name -> base tensor name, checked: LoRA weights, missing names and other shapes stop with
    one UserError listing the first few."""
    matched, missing, mismatched = {}, [], []
    for raw_name, p in named_params:
        name = _clean_name(raw_name)
        if "lora_" in name:
            raise UserError(
                f"online merging: parameter '{name}' is a LoRA adapter weight, which has no SFT delta "
                "(τ_r = SFT − base exists only for full weights); use `optimizer: adamw` with LoRA, or train without LoRA"
            )
        base_name = name if name in source else TIED_ALIASES.get(name)
        if base_name is None or base_name not in source:
            missing.append(name)
        elif source.shape(base_name) != tuple(p.shape):
            mismatched.append(f"{name} {tuple(p.shape)} vs base {source.shape(base_name)}")
        else:
            matched[raw_name] = base_name
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
    return matched


def local_sft_delta(p: torch.Tensor, base_rows: torch.Tensor) -> torch.Tensor:
    """τ_r of this rank's part of `p` (all of it when unsharded), given the base's same rows; in p's dtype."""
    mine = local(p).detach()
    return mine.float().sub(base_rows.to(mine.device, torch.float32).view_as(mine)).to(p.dtype)


def compute_sft_delta(
    named_params: Iterable[tuple[str, torch.Tensor]], base: Mapping[str, torch.Tensor] | str | Path, **load_kwargs
) -> dict[str, torch.Tensor]:
    """τ_r = current params − base params, by name, in each param's dtype; for a sharded (DTensor) parameter only
    this rank's local shard, read from the base row block by row block. Names missing from the base or with
    another shape stop with one UserError that lists them."""
    named = list(named_params)
    source = open_base(base, **load_kwargs)
    matched = match_base(named, source)
    return {raw: local_sft_delta(p, source.rows(matched[raw], *layout(raw, p).rows)) for raw, p in named}


# ---------------------------------------------------------------- the merges (float32; sparsifiers: merge_shards)


def sign_consensus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ⊕ b: a + b where the signs agree; otherwise whichever has the larger magnitude (a on a tie)."""
    agree = torch.sign(a) == torch.sign(b)
    larger = torch.where(a.abs() >= b.abs(), a, b)
    return torch.where(agree, a + b, larger)


class MergeSite(NamedTuple):
    """Which tensor a merge works on: its clean name, the optimizer step, where this rank's part lies."""

    name: str
    step: int
    shard: ShardLayout


def whole(x: torch.Tensor, name: str = "w", step: int = 1) -> MergeSite:
    """The site of an unsharded tensor (for calling `merge` by hand)."""
    return MergeSite(name, step, layout(name, x))


# ---------------------------------------------------------------- optimizers


class OnlineMergingOptimizer(torch.optim.Optimizer):
    """AdamW whose update is merged with the SFT delta τ_r; subclasses define `merge`.

    params: (name, param) pairs, or param groups whose "params" are (name, param) pairs (per-group options:
    lr, betas, eps, weight_decay, reserve_rate, merge_alpha). Give the base checkpoint as `base` (a state dict,
    a checkpoint folder, or a preset loaded with `load_model(base, "policy", **base_load_kwargs)`; τ_r = the
    params at the first step − base), or τ_r itself as `sft_delta` (name -> whole tensor). Names and shapes
    are checked at once; τ_r is built by `initialize_state()` (at the first `step()`), so the optimizer may be
    created before the trainer shards the model (accelerate's FSDP2 swaps in the DTensor parameters later).
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
                        merge_alpha=merge_alpha, merge_variant=self.variant, merge_every=merge_every,
                        merge_rescale=rescale, merge_seed=seed)
        super().__init__(groups, defaults)
        self.rescale = rescale
        self.merge_every = merge_every
        self.seed = seed
        named = list(self._named_params())
        if sft_delta is None:
            self._base, self._given_delta = open_base(base, **(base_load_kwargs or {})), None
            self._base_names = match_base(named, self._base)
        else:
            self._base, self._given_delta = None, {}
            for name, p in named:
                tau = sft_delta.get(name, sft_delta.get(_clean_name(name)))
                if tau is None:
                    raise UserError(f"online merging: no SFT delta for parameter '{name}'")
                if tuple(tau.shape) != tuple(p.shape):
                    raise UserError(f"online merging: SFT delta for '{name}' has shape {tuple(tau.shape)}, "
                                    f"param {tuple(p.shape)}")
                self._given_delta[name] = tau
        self._layouts: dict[torch.Tensor, ShardLayout] = {}

    def _named_params(self) -> Iterable[tuple[str, torch.Tensor]]:
        for g in self.param_groups:
            yield from zip(g["param_names"], g["params"])

    def _layout(self, name: str, p: torch.Tensor) -> ShardLayout:
        if p not in self._layouts:
            self._layouts[p] = layout(name, p)
        return self._layouts[p]

    def initialize_state(self) -> None:
        """Give every parameter its full state: τ_r (from the parameters as they are now — the weights the stage
        starts from — minus this rank's rows of the base) and zero Adam moments. Runs at the first `step()` and
        in `state_dict()`; call it before `torch.distributed.checkpoint`'s `set_optimizer_state_dict`, whose own
        initialisation is a zero-gradient step at LR 0 — which here would still add α·F(τ_r) to the weights."""
        for name, p in self._named_params():
            state = self.state[p]
            if "sft_delta" not in state:
                if self._base is None and self._given_delta is None:
                    raise UserError(f"online merging: the loaded optimizer state has no SFT delta for '{name}'")
                rows = self._layout(name, p).rows
                if self._base is not None:
                    tau = local_sft_delta(p, self._base.rows(self._base_names[name], *rows))
                else:
                    given = self._given_delta[name]
                    tau = given if given.dim() == 0 else given[rows[0]:rows[1]]
                    tau = tau.detach().to(p.device, p.dtype).clone()
                state["sft_delta"] = like_param(tau, p)
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if self.merge_every > 1:
                    state["merge_accum"] = torch.zeros_like(p, dtype=torch.float32)
        self._base = self._base_names = self._given_delta = None  # the base is read once

    def sft_delta_norm(self) -> float:
        """‖τ_r‖ over all parameters (a collective per sharded parameter: call it on every rank)."""
        self.initialize_state()
        total = 0.0
        for _, p in self._named_params():
            tau = self.state[p]["sft_delta"]
            squares = tau.float().pow(2).sum()
            total += float(squares.full_tensor() if hasattr(squares, "full_tensor") else squares)
        return math.sqrt(total)

    # -- the merge ---------------------------------------------------------

    def merge(self, update: torch.Tensor, tau: torch.Tensor, group: dict, site: MergeSite) -> torch.Tensor:
        raise NotImplementedError

    # -- the step ------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.initialize_state()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for name, p in zip(group["param_names"], group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("online merging optimizers do not support sparse gradients")
                state = self.state[p]
                state["step"] += 1
                step = int(state["step"].item())
                site = MergeSite(_clean_name(name), step, self._layout(name, p))
                # Elementwise from here to the merge: on this rank's shard (the whole tensor when unsharded).
                param, grad = local(p), local(p.grad).float()
                exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
                # Moments in the param dtype (as torch AdamW keeps them), arithmetic in float32.
                m = exp_avg.float().lerp_(grad, 1 - beta1)
                v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.copy_(m)
                exp_avg_sq.copy_(v)
                bias1 = 1 - beta1**step
                bias2_sqrt = math.sqrt(1 - beta2**step)
                update = m.div((v.sqrt() / bias2_sqrt).add_(eps)).mul_(-lr / bias1)

                theta = param.float()
                if wd != 0:
                    theta.mul_(1 - lr * wd)
                tau = local(state["sft_delta"]).float()
                if self.merge_every == 1:
                    theta.add_(self.merge(update, tau, group, site))
                else:
                    accum = local(state["merge_accum"])
                    if step % self.merge_every:
                        theta.add_(update)  # a plain Adam step, remembered
                        accum.add_(update)
                    else:  # roll the accumulated steps back, apply the merged total
                        total = accum.add_(update)
                        theta.sub_(total - update).add_(self.merge(total, tau, group, site))
                        accum.zero_()
                param.copy_(theta)
        return loss

    # -- state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.initialize_state()
        out = super().state_dict()
        out["online_merging"] = {"variant": self.variant, "merge_every": self.merge_every,
                                 "rescale": self.rescale, "seed": self.seed}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("online_merging", None)
        saved_groups = state_dict.get("param_groups") or [{}]
        if extra is None and "merge_variant" in saved_groups[0]:
            g = saved_groups[0]
            extra = {"variant": g["merge_variant"], "merge_every": g["merge_every"], "rescale": g["merge_rescale"],
                     "seed": g["merge_seed"]}
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
        if all("sft_delta" in self.state[p] for _, p in self._named_params()):
            self._base = self._base_names = self._given_delta = None  # the loaded τ_r wins; the base is not read
        for g in self.param_groups:
            g.update(merge_variant=self.variant, merge_every=self.merge_every, merge_rescale=self.rescale,
                     merge_seed=self.seed)

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

    def merge(self, update, tau, group, site):
        p, alpha = group["reserve_rate"], group["merge_alpha"]
        mask = block_random_mask(update, p, site.shard, self.seed, site.name, site.step, "update")
        merged = update.mul_(mask).mul_(1 - alpha)
        if alpha:
            tau_mask = block_random_mask(tau, p, site.shard, self.seed, site.name, site.step, "sft_delta")
            merged.add_(tau * tau_mask, alpha=alpha)
        if self.rescale and p < 1:
            merged.div_(p)
        return merged


class OnTIES(OnlineMergingOptimizer):
    """θ ← θ + (a ⊕ b), a = (1−α)·F(Δθ), b = α·F(τ_r), F = keep the top-p fraction by magnitude (per whole
    tensor, also when sharded), ⊕ = sign consensus. Deterministic: no random numbers."""

    variant = "onties"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tau_cuts: dict[str, tuple[int, int] | None] = {}  # τ_r is fixed, so is where F(τ_r) cuts

    def merge(self, update, tau, group, site):
        p, alpha = group["reserve_rate"], group["merge_alpha"]
        a = update.mul_(top_fraction_mask(update, p, site.shard)).mul_(1 - alpha)
        if not alpha:
            return a
        if site.name not in self._tau_cuts:
            self._tau_cuts[site.name] = top_fraction_cut(tau, p, site.shard)
        b = tau.mul(mask_from_cut(tau, self._tau_cuts[site.name])).mul_(alpha)
        return sign_consensus(a, b)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._tau_cuts = {}


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
