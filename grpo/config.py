"""GRPO stage options. Defaults are the Qwen2.5 report's: 8 responses per query, 2048 samples per optimizer
step (256 queries x 8), queries ordered by the reward variance of the current policy, the trained reward
model plus rule-based verifiers as rewards."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from qwen_align.recipe import DataConfig, StageConfig, Strict

# TRL 1.16's GRPOConfig.loss_type values (tests/test_grpo_config.py checks this list against TRL).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")


class RewardSpec(Strict):
    kind: Literal["reward_model", "verifier"] = Field(
        description="`reward_model`: a trained reward model scores the chat-formatted prompt + response; "
        "`verifier`: the row's verifier (qwen_align.verifiers) scores 1/0, rows without one are skipped."
    )
    source: str | None = Field(
        None, description="reward_model: an earlier stage's name or a checkpoint folder; default: the recipe's "
        "reward_model stage."
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum the advantages come from.")
    name: str | None = Field(None, description="Name in the logs (rewards/<name>/mean, /std); default: the kind.")

    @model_validator(mode="after")
    def _source_only_for_rm(self):
        if self.kind == "verifier" and self.source is not None:
            raise ValueError("`source` names a reward model; a verifier reward takes none")
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


def _default_rewards() -> list[dict]:
    return [{"kind": "reward_model", "weight": 1.0}, {"kind": "verifier", "weight": 1.0}]


class Config(StageConfig):
    kind: Literal["grpo"] = "grpo"
    data: DataConfig | None = Field(
        None, description="Query set (prompt rows, verifier fields kept); default: the reward model stage's prompts."
    )
    learning_rate: float = Field(1e-6, gt=0)
    per_device_train_batch_size: int = Field(16, gt=0, description="Completions per device per micro-batch.")
    gradient_accumulation_steps: int = Field(
        16, gt=0, description="Report: 16 x 16 x 8 processes = 2048 samples (256 queries x 8) per step."
    )
    global_batch_samples: int | None = Field(
        None, gt=0, description="When set, the recipe is refused unless per device x accumulation x num_processes "
        "equals it (the report: 2048)."
    )
    num_generations: int = Field(8, ge=2, description="Report: 8 responses per query.")
    steps_per_generation: int | None = Field(
        None, gt=0, description="Micro-batches per generation batch (TRL); default: gradient_accumulation_steps."
    )
    num_iterations: int = Field(1, gt=0, description="Optimisation passes over each generation batch (GRPO's mu).")
    loss_type: str = Field("grpo", description="The GRPO paper's loss; any of TRL's: " + ", ".join(LOSS_TYPES) + ".")
    beta: float = Field(0.0, ge=0, description="KL coefficient.")
    epsilon: float = Field(0.2, gt=0, description="Clipping epsilon (lower bound).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping bound; default: epsilon.")
    delta: float | None = Field(
        None, gt=1, description="Two-sided clipping (TRL's `delta`, INTELLECT-2): the importance ratio of a "
        "negative-advantage token is capped at delta too, so samples far older than the policy (the ordering "
        "pass's, trained on many steps later) cannot give an unbounded push."
    )
    skip_steps_without_gradient: bool = Field(
        True, description="Skip the optimizer step when the gradient is exactly zero (every group's rewards "
        "equal, β = 0), so AdamW's momentum does not move the weights on a step that learned nothing. "
        "Single process and DDP; off under FSDP2 / ZeRO-3."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Advantage scaling (TRL).")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_length: int = Field(2048, gt=0)
    rewards: list[RewardSpec] = Field(
        default_factory=_default_rewards, min_length=1, validate_default=True,
        description="Rewards summed with their weights; each is logged on its own (mean and spread).",
    )
    order_by_reward_variance: bool = Field(True, description="Report: highest reward variance first; false: shuffled.")
    ordering_samples: int | None = Field(
        None, ge=2, description="Responses per query in an ordering pass; default: num_generations (the only value "
        "train_on_ordering_samples allows)."
    )
    train_on_ordering_samples: bool = Field(
        True, description="Train on the ordering pass's samples (with their sampling log-probs, TRL's importance "
        "ratio correcting for their age) instead of generating those queries again: ordering costs no extra rollout."
    )
    ordering_window: int | None = Field(
        8, gt=0, description="The first pass is ranked this many generation batches at a time, as training reaches "
        "them: each window's queries are sampled then and ranked highest variance first (flat ones last); trained "
        "on, the samples are at most this many batches old. null: the whole query set is sampled before training "
        "(the last queries' samples are a whole pass old when trained on)."
    )
    ordering_batch_size: int = Field(64, gt=0, description="Prompts generated at once in an ordering pass.")
    variance_epsilon: float = Field(
        1e-6, ge=0, description="Queries whose reward variance is at or below this count as low variance."
    )
    low_variance_policy: Literal["last", "drop", "rescore"] = Field(
        "last", description="Low-variance queries: train on them last, drop them, or re-score them when reached."
    )
    reorder_every_steps: int | None = Field(
        None, gt=0, description="Re-rank the queries not yet used in the pass every N optimizer steps."
    )
    reorder_each_epoch: bool = Field(True, description="Re-rank all queries at each new pass over the query set.")
    reorder_source: Literal["rollouts", "ordering_pass"] = Field(
        "rollouts", description="Re-rank by each query's reward variance in its latest training rollouts (no "
        "sampling), or sample the queries again (ordering_pass)."
    )
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="Generation of the training batches: transformers' generate, or vLLM through "
        "TRL's integration (`use_vllm`; needs vllm and a GPU; unmeasured here). Never chosen unless set."
    )
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="vLLM: an engine inside each training process, or a `trl vllm-serve` server."
    )
    vllm_server_base_url: str | None = Field(
        None, description="vLLM server mode: the server's URL (default: TRL's host 0.0.0.0, port 8000)."
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vLLM colocate: share of GPU memory the engine takes (TRL's default 0.3)."
    )
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM colocate: GPUs one engine is split across.")
    vllm_sleep_mode: bool = Field(
        False, description="vLLM colocate: the engine gives its memory back during the optimizer step (TRL)."
    )

    @model_validator(mode="after")
    def _checks(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of TRL's: {', '.join(LOSS_TYPES)}")
        names = [r.label for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: names must be unique (got {', '.join(names)}); give `name` to tell them apart")
        if self.backend != "vllm" and (self.vllm_server_base_url or self.vllm_mode != "colocate"):
            raise ValueError("vllm_mode / vllm_server_base_url need `backend: vllm`")
        explicit_epoch = "reorder_each_epoch" in self.model_fields_set and self.reorder_each_epoch
        if not self.order_by_reward_variance and (self.reorder_every_steps or explicit_epoch):
            raise ValueError("reorder_every_steps / reorder_each_epoch need order_by_reward_variance: true")
        if self.order_by_reward_variance and self.ordering_window and self.low_variance_policy == "drop":
            raise ValueError("low_variance_policy: drop decides before training which queries to leave out, so it "
                             "needs the whole set ranked first: set ordering_window: null")
        if (self.order_by_reward_variance and self.train_on_ordering_samples and self.ordering_samples is not None
                and self.ordering_samples != self.num_generations):
            raise ValueError(f"ordering_samples {self.ordering_samples} != num_generations {self.num_generations}: "
                             "the ordering pass's samples are trained on (train_on_ordering_samples: true), so it "
                             "samples num_generations per query; drop ordering_samples or set "
                             "train_on_ordering_samples: false")
        return self

    # ------------------------------------------------------------ batch arithmetic

    def generation_batch(self, num_processes: int) -> int:
        spg = self.steps_per_generation or self.gradient_accumulation_steps
        return self.per_device_train_batch_size * num_processes * spg

    def batch_arithmetic(self, num_processes: int) -> str:
        total = self.global_batch(num_processes)
        text = (f"{self.per_device_train_batch_size} per device x {self.gradient_accumulation_steps} accumulation x "
                f"{num_processes} process(es) = {total} samples")
        if total % self.num_generations == 0:
            text += f" = {total // self.num_generations} queries x {self.num_generations}"
        return text

    def earlier_reward_models(self, recipe) -> list[StageConfig]:
        """The recipe's reward_model stages before this one, in order (the last is the default RM)."""
        names = [s.name for s in recipe.stages]
        earlier = recipe.stages[: names.index(self.name)] if self.name in names else recipe.stages
        return [s for s in earlier if s.kind == "reward_model"]

    def check_recipe(self, recipe) -> tuple[str, str] | None:
        n = recipe.num_processes
        total = self.global_batch(n)
        if total % self.num_generations:
            return ("per_device_train_batch_size", f"{self.batch_arithmetic(n)}, which is not a whole number of "
                    f"queries x {self.num_generations} generations; make it a multiple of num_generations")
        if self.global_batch_samples is not None and total != self.global_batch_samples:
            return ("global_batch_samples", f"{self.batch_arithmetic(n)}, not the {self.global_batch_samples} "
                    "asked for")
        if self.generation_batch(n) % self.num_generations:
            return ("steps_per_generation", f"generation batch {self.generation_batch(n)} (per device x processes "
                    f"x steps_per_generation) is not a multiple of num_generations {self.num_generations}")
        rm_stages = [s.name for s in self.earlier_reward_models(recipe)]
        for i, spec in enumerate(self.rewards):
            if spec.kind != "reward_model":
                continue
            if spec.source is None and not rm_stages:
                return (f"rewards.{i}.source", "no earlier reward_model stage in the recipe; name a reward model "
                        "checkpoint folder")
            if spec.source is not None and any(s.name == spec.source for s in recipe.stages):
                if spec.source not in rm_stages:
                    return (f"rewards.{i}.source", f"{spec.source!r} is not an earlier reward_model stage")
        if self.data is None and not rm_stages:
            return ("data", "no query set: give `data` (prompt rows) or put a reward_model stage before this one")
        return None

    def referenced_stages(self, recipe) -> list[str]:
        """Earlier stages this stage reads beyond init_from and data: reward models, the default query set."""
        earlier = recipe.stages[: [s.name for s in recipe.stages].index(self.name)]
        rm_stages = [s.name for s in self.earlier_reward_models(recipe)]
        names = [spec.source or (rm_stages[-1] if rm_stages else None) for spec in self.rewards
                 if spec.kind == "reward_model"]
        if self.data is None and rm_stages:
            names.append(rm_stages[-1])
        return [n for n in dict.fromkeys(names) if n is not None and n in {s.name for s in earlier}]

    def resolve_paths(self, fix, stage_names: set[str]) -> None:
        for spec in self.rewards:
            if spec.source is not None and spec.source not in stage_names:
                spec.source = fix(spec.source)

    def key_hyperparameters(self) -> dict[str, Any]:
        rewards = " + ".join(f"{r.weight:g}*{r.label}" for r in self.rewards)
        order = "reward variance" if self.order_by_reward_variance else "shuffled"
        return {
            **super().key_hyperparameters(),
            "num_generations": self.num_generations,
            "loss_type": self.loss_type,
            "beta": self.beta,
            "rewards": rewards,
            "query_order": order,
        }
