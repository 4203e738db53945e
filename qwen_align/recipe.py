"""Recipe schema: one YAML file, validated into typed models; the single source of every key and default.

Stage kinds add their own options by subclassing `StageConfig` in their package (see `registry`).
Relative paths inside a recipe are taken from the recipe file's folder, except `run_dir`, which is taken
from the directory the command runs in.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from . import distributed, registry
from .errors import RecipeError


def _check_report_to(value):
    from .tracking import normalise

    normalise(value)  # ValueError names the bad value
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(Strict):
    path: str | None = Field(
        None, description="Local JSONL/JSON/Parquet file, folder of them, or `save_to_disk` folder (or a hub name "
        "when online). With `stage`: a file or folder inside that stage's output."
    )
    stage: str | None = Field(
        None, description="Read an earlier stage's output instead, e.g. the rejection_sampling stage's pairs."
    )
    output: str | None = Field(
        None, description="With `stage`: which of its named outputs (rejection_sampling: `pairs`, `sft`); "
        "default: its main output."
    )
    weight: float = Field(
        1.0, gt=0, description="Multiplier on this source's examples: 0.5 takes a seeded half, 2 repeats it twice."
    )
    split: str = Field("train", description="Split to read from a DatasetDict folder or a hub dataset.")

    @model_validator(mode="after")
    def _one_origin(self):
        if self.stage is None and self.path is None:
            raise ValueError("give `path` (a file or folder) or `stage` (an earlier stage's output)")
        if self.output is not None and self.stage is None:
            raise ValueError("`output` names an output of `stage`; give `stage` too")
        return self

    def describe(self) -> str:
        if self.stage is None:
            return Path(self.path).name
        where = f"stage {self.stage}" + (f" ({self.output})" if self.output else "")
        return where + (f"/{self.path}" if self.path else "")


class DataConfig(Strict):
    sources: list[DataSource] = Field(min_length=1, description="Training data, mixed by weight (seeded).")
    system_prompts: str | list[str] | None = Field(
        None,
        description="Pool of system prompts, a list or a text file (one per line); one is sampled for each "
        "example that has no system message (the report's robust system instructions).",
    )
    system_prompt_probability: float = Field(
        1.0, ge=0, le=1, description="Share of examples without a system message that get one from the pool."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="`error` stops at the first malformed row (file:line); `skip` drops and counts them."
    )
    max_examples: int | None = Field(None, gt=0, description="Cap on the mixed examples (for smoke tests).")


class TaskEval(Strict):
    """Held-out prompts with checkable answers: greedy answers are verified and the accuracy recorded."""

    path: str = Field(description="JSONL of rows with `messages` (the prompt) and verifier fields.")
    max_new_tokens: int = Field(32, gt=0, description="Longest answer generated.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N rows.")
    batch_size: int = Field(64, gt=0, description="Prompts generated at once.")
    every_steps: int | None = Field(
        None, gt=0, description="Also evaluate every N optimizer steps while training (logged as "
        "`heldout_accuracy` at that step: a held-out curve in metrics.jsonl and the report); single-process and "
        "DDP only. Each evaluation costs one greedy pass over the rows."
    )
    stop_at: float | None = Field(
        None, gt=0, le=1, description="Stop training at the first `every_steps` evaluation whose accuracy reaches "
        "this (max_steps stays the limit); the stage's output is the model of that step."
    )

    @model_validator(mode="after")
    def _stop_needs_evaluations(self):
        if self.stop_at is not None and not self.every_steps:
            raise ValueError("stop_at is checked at the every_steps evaluations; set every_steps too")
        return self


class LoraOptions(Strict):
    r: int = Field(16, gt=0, description="Adapter rank.")
    lora_alpha: int = Field(32, gt=0, description="Adapter scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names (or a regex) that get adapters; the reward model's `score` head trains in full.",
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: load the frozen base 4-bit (nf4, bf16 compute) or 8-bit with bitsandbytes; "
        "needs a CUDA GPU."
    )
    save: Literal["merged", "adapter"] = Field(
        "merged", description="`merged`: plain weights every stage and engine loads; `adapter`: a peft adapter "
        "folder whose base is the stage's start (later stages load base + adapter, merged)."
    )


class RopeScaling(Strict):
    """RoPE scaling written into the model's config (Qwen's published form: `rope_scaling` in config.json)."""

    type: Literal["yarn", "linear", "dynamic"] = Field("yarn", description="Report: YaRN.")
    factor: float = Field(4.0, gt=1, description="Report: 4 (32,768 -> 131,072 tokens).")
    original_max_position_embeddings: int = Field(32_768, gt=0, description="The length the model was trained at.")

    @property
    def max_length(self) -> int:
        return int(self.factor * self.original_max_position_embeddings)


STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StageConfig(Strict):
    """Options every stage kind has. Training options keep their transformers/TRL names."""

    trains: ClassVar[bool] = True  # False for kinds that only sample (no optimizer, no global batch)

    name: str = Field(description="Unique name; other stages refer to it in `init_from`.")
    kind: str = Field(description="One of: " + ", ".join(registry.STAGE_KINDS))
    init_from: str | None = Field(
        None, description="A previous stage's name, or a checkpoint path; default: the recipe's `model`."
    )
    data: DataConfig | None = Field(None, description="The stage's training data (see `data`).")
    task_eval: TaskEval | None = Field(None, description="Held-out prompts checked after the stage (see `task_eval`).")
    # Model options
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype (`auto`: bfloat16 on a GPU that has it, else float32). A training stage "
        "keeps float32 master weights and optimizer state and autocasts to bfloat16/float16 (on CPU too)."
    )
    pure_bf16: bool = Field(
        False, description="Train the weights and optimizer state themselves in bfloat16 (no float32 master copy): "
        "half the memory, but updates below bf16's spacing (~0.4% of a weight) are lost."
    )
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the stage's output checkpoint; `auto`: the input checkpoint's (a preset: float32).",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="`auto`: flash_attention_2 when installed on a GPU, else sdpa. Packed rows never attend "
        "across documents under any of them; `flex_attention` (PyTorch's) also skips the masked blocks' compute."
    )
    gradient_checkpointing: bool = Field(False, description="True trades compute for activation memory.")
    lora: LoraOptions | None = Field(None, description="Train LoRA/QLoRA adapters (peft) on a frozen base (see `lora`).")
    chat_template: str = Field(
        "auto", description="`auto`: the start checkpoint's template (Qwen2.5's when it has none); `qwen2.5`; or a "
        ".jinja file. The output checkpoint carries it as plain Jinja."
    )
    rope_scaling: RopeScaling | None = Field(
        None, description="Long context (see `rope_scaling`); lands in the output config. Report: YaRN x4 over 32,768."
    )
    max_shard_size: int | str | None = Field(
        None, description="Output safetensors shard limit (bytes or e.g. \"5GB\"); default: like the start "
        "checkpoint's largest shard, else transformers' default."
    )
    # Training options (transformers.TrainingArguments names)
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the data.")
    max_steps: int = Field(-1, description="Positive: stop after this many optimizer steps (overrides epochs).")
    per_device_train_batch_size: int = Field(1, gt=0, description="Sequences per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled (AdamW) weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm.")
    lr_scheduler_type: str = Field("linear", description="A transformers scheduler name.")
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict, description="Scheduler options, e.g. min_lr.")
    warmup_steps: float = Field(0, ge=0, description="Steps, or a fraction of all steps when below 1.")
    logging_steps: int = Field(10, gt=0, description="Steps between metric records (console, metrics.jsonl).")
    save_steps: int = Field(500, gt=0, description="Checkpoint interval; an interrupted stage resumes from the last.")
    save_every_minutes: float | None = Field(
        30, gt=0, description="Also save a checkpoint when this many minutes have passed since the last one "
        "(`null`: steps only). 30 bounds the work a kill loses while keeping the time spent writing large "
        "checkpoints small."
    )
    save_total_limit: int | None = Field(2, description="Keep only this many trainer checkpoints.")
    report_to: str | list[str] | None = Field(
        None, description="This stage's trackers (see the recipe's `report_to`); default: the recipe's."
    )

    @field_validator("report_to")
    @classmethod
    def _report_to_ok(cls, v):
        return _check_report_to(v)

    @model_validator(mode="after")
    def _pure_bf16_is_bf16(self):
        if self.pure_bf16 and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(f"pure_bf16 trains in bfloat16; set dtype: bfloat16 (got {self.dtype})")
        return self

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not STAGE_NAME.match(v):
            raise ValueError("use letters, digits, '_', '-', '.'")
        return v

    def global_batch(self, num_processes: int) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes

    def data_fields(self) -> dict[str, DataConfig]:
        """Every data option the stage has (`data`, and kinds' extras such as `eval_data`), by key."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return {name: value for name, value in fields.items() if isinstance(value, DataConfig)}

    def check_recipe(self, recipe: "Recipe") -> tuple[str, str] | None:
        """Checks that need the whole recipe (e.g. `num_processes`): (key, problem) or None; kinds override."""
        return None

    def referenced_stages(self, recipe: "Recipe") -> list[str]:
        """Earlier stages read through options of the kind's own (e.g. a reward model); kinds override."""
        return []

    def resolve_paths(self, fix: Callable[[str], str], stage_names: set[str]) -> None:
        """Make the kind's own path options absolute with `fix`, leaving stage names alone; kinds override."""

    def batch_arithmetic(self, num_processes: int) -> str:
        """How the global batch comes about, for `plan`."""
        return (f"{self.per_device_train_batch_size} per device x {self.gradient_accumulation_steps} accumulation "
                f"x {num_processes} process(es) = {self.global_batch(num_processes)}")

    def key_hyperparameters(self) -> dict[str, Any]:
        """What `plan` shows for this stage; kinds extend it."""
        schedule = f"{self.lr_scheduler_type}"
        if "min_lr" in self.lr_scheduler_kwargs:
            schedule += f" -> {self.lr_scheduler_kwargs['min_lr']:g}"
        return {
            "learning_rate": self.learning_rate,
            "schedule": schedule,
            "epochs": self.num_train_epochs if self.max_steps <= 0 else f"max_steps={self.max_steps}",
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
        }


class Recipe(Strict):
    model: str = Field(description="Checkpoint directory or preset (tiny, 0.5b, 1.5b, 3b, 7b, 14b, 32b, 72b).")
    tokenizer: str | None = Field(None, description="Tokenizer folder; default: the model's checkpoint folder.")
    run_dir: str = Field(description="Where manifest, metrics, logs and checkpoints go.")
    seed: int = Field(42, description="Seeds model init, data mixing, sampling and training.")
    num_processes: int = Field(1, gt=0, description="Processes the chain runs on (global batch arithmetic); unset: "
                               "the launch's world size; set: a run with another world size stops.")
    report_to: str | list[str] = Field(
        "none", description="Trackers every training stage logs to through the transformers integrations: none, "
        "tensorboard (`<stage>/tensorboard`), wandb (offline unless an API key is set), mlflow, trackio; a list for "
        "several. The run is named `<recipe>-<stage>`; each stage's manifest metrics follow as its summary."
    )
    stages: list[SerializeAsAny[StageConfig]] = Field(min_length=1, description="The chain, run in order.")

    # Where the recipe came from; not part of the schema.
    source: str | None = Field(None, exclude=True)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(f"{self.source}: no stage named '{name}' (stages: {', '.join(s.name for s in self.stages)})")

    @field_validator("report_to")
    @classmethod
    def _report_to_ok(cls, v):
        return _check_report_to(v)

    def integrations(self, stage: StageConfig) -> list[str]:
        """The trackers `stage` reports to: its own `report_to`, else the recipe's."""
        from .tracking import normalise

        return normalise(stage.report_to if stage.report_to is not None else self.report_to)

    def resolved_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- loading


def _yaml_key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, path + (key.value,))
                lines[path + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _error_line(source: str, loc: tuple, lines: dict[tuple, int], message: str) -> RecipeError:
    line = None
    for cut in range(len(loc), -1, -1):  # nearest enclosing key that exists in the file
        line = lines.get(tuple(loc[:cut]))
        if line:
            break
    where = f"{source}:{line}" if line else source
    return RecipeError(f"{where}: {_format_loc(loc)}: {message}")


def _pydantic_message(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    if "input" in err and err["type"] not in ("model_type", "dict_type"):
        return f"{msg} (got {err['input']!r})"
    return msg


def apply_override(raw: dict, assignment: str) -> None:
    """`key.path=value` on the raw recipe; stages are addressed by name or index (`stages.sft.learning_rate`)."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment}: expected key.path=value")
    key, value_text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(value_text) if value_text != "" else None
    except yaml.YAMLError:
        value = value_text
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, key)
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise RecipeError(f"--set {key}: '{'.'.join(parts[:i])}' is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        raise RecipeError(f"--set {key}: give a key inside the list item, not the item itself")
    if not isinstance(node, dict):
        raise RecipeError(f"--set {key}: '{'.'.join(parts[:-1])}' is not a mapping")
    node[last] = value


def _list_item(items: list, part: str, key: str):
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    raise RecipeError(f"--set {key}: no list item named or numbered '{part}'")


def load_recipe(path: str | Path, overrides: list[str] | None = None, world_size: int | None = None) -> Recipe:
    """The validated recipe; `world_size` (a run's number of processes) must equal a `num_processes` it sets."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{source}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{source}: cannot read recipe ({e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with model, run_dir and stages")
    raw = copy.deepcopy(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return validate_recipe(raw, source, _yaml_key_lines(text), base_dir=path.parent, world_size=world_size)


def validate_recipe(raw: dict, source: str, lines: dict[tuple, int] | None = None, base_dir: Path | None = None,
                    world_size: int | None = None) -> Recipe:
    lines = lines or {}
    raw_stages = raw.get("stages")
    stages: list[StageConfig] = []
    if isinstance(raw_stages, list):
        for i, item in enumerate(raw_stages):
            stages.append(_validate_stage(item, i, source, lines))
    try:
        recipe = Recipe.model_validate({**raw, "stages": stages if isinstance(raw_stages, list) else raw_stages})
    except ValidationError as e:
        err = e.errors()[0]
        raise _error_line(source, tuple(err["loc"]), lines, _pydantic_message(err)) from None
    recipe.source = source
    _check_num_processes(recipe, lines, world_size)
    base_dir = base_dir or Path.cwd()
    _check_chain(recipe, lines, base_dir)
    _check_stages_against_recipe(recipe, lines)
    _resolve_paths(recipe, base_dir)
    _check_context_lengths(recipe, lines)
    return recipe


def _check_num_processes(recipe: Recipe, lines: dict[tuple, int], world_size: int | None) -> None:
    """Unset, `num_processes` is the launch's world size; set, a run with another world size stops."""
    if "num_processes" not in recipe.model_fields_set:
        recipe.num_processes = world_size or distributed.world_size()
    elif world_size is not None and recipe.num_processes != world_size:
        raise _error_line(recipe.source, ("num_processes",), lines,
                          f"{recipe.num_processes}, but this run has {world_size} process(es); launch "
                          f"{recipe.num_processes}, or --set num_processes={world_size} (the global batch changes)")


def _validate_stage(item: Any, index: int, source: str, lines: dict[tuple, int]) -> StageConfig:
    loc = ("stages", index)
    if not isinstance(item, dict):
        raise _error_line(source, loc, lines, "a stage is a mapping with name, kind and options")
    kind = item.get("kind")
    if kind is None:
        raise _error_line(source, loc + ("kind",), lines, "required key is missing")
    if kind not in registry.STAGE_KINDS:
        raise _error_line(source, loc + ("kind",), lines, f"unknown stage kind {kind!r}; choose from {', '.join(registry.STAGE_KINDS)}")
    config_cls = registry.config_class(kind)
    try:
        return config_cls.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        raise _error_line(source, loc + tuple(err["loc"]), lines, _pydantic_message(err)) from None


def _check_stages_against_recipe(recipe: Recipe, lines: dict[tuple, int]) -> None:
    for i, stage in enumerate(recipe.stages):
        problem = stage.check_recipe(recipe)
        if problem:
            key, message = problem
            parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
            raise _error_line(recipe.source, ("stages", i, *parts), lines, message)


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    """Make relative paths absolute against the recipe's folder (run_dir stays relative to the CWD)."""

    def fix(p: str) -> str:
        candidate = Path(p).expanduser()
        if candidate.is_absolute():
            return str(candidate)
        resolved = (base / candidate).resolve()
        # A non-existing "org/name" may be a hub dataset; keep it as written then.
        return p if not resolved.exists() and looks_like_hub_name(p) else str(resolved)

    from .data import looks_like_hub_name

    _map_recipe_paths(recipe, fix)


def _map_recipe_paths(recipe: Recipe, fn: Callable[[str], str]) -> None:
    """Replace every input path of the recipe (model, tokenizer, each stage's) by `fn(path)`, in place."""
    from .presets import preset_name

    if preset_name(recipe.model) is None:
        recipe.model = fn(recipe.model)
    if recipe.tokenizer:
        recipe.tokenizer = fn(recipe.tokenizer)
    names = {s.name for s in recipe.stages}
    for stage in recipe.stages:
        map_stage_paths(stage, fn, names)


def map_stage_paths(stage: StageConfig, fn: Callable[[str], str], stage_names: set[str]) -> None:
    """Replace every input path of `stage` by `fn(path)`, in place; names of stages are left alone."""
    if stage.init_from and stage.init_from not in stage_names:
        stage.init_from = fn(stage.init_from)
    for data in stage.data_fields().values():
        for src in data.sources:
            if src.path is not None and src.stage is None:
                src.path = fn(src.path)
        if isinstance(data.system_prompts, str):
            data.system_prompts = fn(data.system_prompts)
    if stage.task_eval:
        stage.task_eval.path = fn(stage.task_eval.path)
    if stage.chat_template not in ("auto", "qwen2.5"):
        stage.chat_template = fn(stage.chat_template)
    stage.resolve_paths(fn, stage_names)


def _check_chain(recipe: Recipe, lines: dict[tuple, int], base_dir: Path) -> None:
    seen: set[str] = set()
    for i, stage in enumerate(recipe.stages):
        if stage.name in seen:
            raise _error_line(recipe.source, ("stages", i, "name"), lines, f"duplicate stage name {stage.name!r}")
        ref = stage.init_from
        if ref is not None and ref not in seen:
            later = any(s.name == ref for s in recipe.stages[i:])
            if later or not (base_dir / Path(ref).expanduser()).exists():
                why = "names a later stage" if later else "is neither an earlier stage nor an existing path"
                raise _error_line(recipe.source, ("stages", i, "init_from"), lines, f"{ref!r} {why}")
        for key, data in stage.data_fields().items():
            for j, src in enumerate(data.sources):
                if src.stage is not None and src.stage not in seen:
                    why = "names a later stage" if any(s.name == src.stage for s in recipe.stages) else "is not a stage"
                    where = ("stages", i, key, "sources", j, "stage")
                    raise _error_line(recipe.source, where, lines, f"{src.stage!r} {why}; name an earlier stage")
        seen.add(stage.name)


def _start_limit(source: str) -> tuple[int | None, str]:
    """The longest sequence the model at `source` (preset or checkpoint folder) attends, read from config only."""
    from .checkpoints.published import context_limit
    from .presets import PRESETS, preset_name

    name = preset_name(source)
    if name is not None and not Path(source).exists():
        return PRESETS[name].max_position_embeddings, f"preset '{name}'"
    config_path = Path(source) / "config.json"
    if not config_path.is_file():
        return None, source
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecipeError(f"{config_path}: cannot read ({e})") from None
    return context_limit(config), str(config_path)


def _check_context_lengths(recipe: Recipe, lines: dict[tuple, int]) -> None:
    """A stage's `max_length` beyond what its model can attend stops here, before any stage runs."""
    limits: dict[str, tuple[int | None, str]] = {}
    for i, stage in enumerate(recipe.stages):
        if stage.init_from in limits:
            limit, origin = limits[stage.init_from]
        else:
            limit, origin = _start_limit(stage.init_from or recipe.model)
        if stage.rope_scaling is not None:
            limit, origin = stage.rope_scaling.max_length, "rope_scaling"
        limits[stage.name] = (limit, origin)
        max_length = getattr(stage, "max_length", None)
        if limit and isinstance(max_length, int) and max_length > limit:
            raise _error_line(recipe.source, ("stages", i, "max_length"), lines,
                              f"{max_length} is beyond the {limit} positions the model attends ({origin}); lower it "
                              "or set `rope_scaling`")


def upstream_stages(recipe: Recipe, stage: StageConfig) -> list[str]:
    """Names of the stages whose outputs this stage reads: `init_from`, data sources' `stage`, and the kind's own.
    Paths are not stages: they enter the stage's hash by their fingerprint."""
    stage_names = {s.name for s in recipe.stages}
    names = [stage.init_from] if stage.init_from in stage_names else []
    names += [src.stage for data in stage.data_fields().values() for src in data.sources if src.stage]
    names += stage.referenced_stages(recipe)
    return list(dict.fromkeys(names))


# How often a stage logs and saves, and where it reports, do not change what it computes: editing these resumes the stage.
BOOKKEEPING_OPTIONS = frozenset({"logging_steps", "save_steps", "save_every_minutes", "save_total_limit", "report_to"})


def stage_hash(recipe: Recipe, stage: StageConfig, upstream_hash: str | None, fingerprints=None) -> str:
    """Identity of a stage's work: its options, what it starts from and reads, the recipe-wide settings.

    Input paths enter by the fingerprint of what they hold (`qwen_align.fingerprint`), not by where they are:
    a data file edited in place changes the hash, the same file copied elsewhere does not.
    """
    from .fingerprint import Fingerprints
    from .presets import preset_name

    prints = fingerprints or Fingerprints()
    identity = stage.model_copy(deep=True)
    map_stage_paths(identity, prints.of, {s.name for s in recipe.stages})
    payload = {
        "stage": identity.model_dump(mode="json", exclude=BOOKKEEPING_OPTIONS),
        "model": recipe.model if preset_name(recipe.model) else prints.of(recipe.model),
        "tokenizer": prints.of(recipe.tokenizer) if recipe.tokenizer else None,
        "seed": recipe.seed,
        "upstream": upstream_hash,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
