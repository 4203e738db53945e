"""Model checkpoints in the layout Qwen publishes them: the one reader and writer every stage uses.

A published Qwen2.5 folder holds config.json (transformers 4 field names: `torch_dtype`, `rope_theta`,
`rope_scaling`), sharded safetensors with `model.safetensors.index.json`, generation_config.json, and the
tokenizer as tokenizer.json + vocab.json + merges.txt + tokenizer_config.json, whose `chat_template` is plain
Jinja (no transformers-only `{% generation %}` tags), so serving engines that render templates themselves
load it. We read such folders as a stage's start and write every stage's output the same way.

Chat templates: a stage trains with a *training* template and its output carries the *published* one.
When the input's template renders like Qwen2.5's on a set of probe conversations, training uses our copy
with generation markers (exact assistant masks) and the output keeps the input's text unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..fsutil import atomic_dir, atomic_write_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# --- chat templates ---------------------------------------------------------------------------

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


def plain_template(template: str) -> str:
    """`template` without transformers' `{% generation %}` markers (they add no text), for any Jinja engine."""
    return _GENERATION_TAG.sub("", template)


def qwen_marker_template() -> str:
    from ..tokenizer import QWEN_CHAT_TEMPLATE

    return QWEN_CHAT_TEMPLATE


def qwen_plain_template() -> str:
    return plain_template(qwen_marker_template())


def _tool(name: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": f"Look up {name}.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    }}


def _call(name: str, q: str, wrapped: bool = True) -> dict:
    call = {"name": name, "arguments": {"q": q}}
    return {"type": "function", "function": call} if wrapped else call


# Conversations whose renders decide whether a template formats like Qwen2.5's: (messages, tools).
PROBE_CONVERSATIONS: list[tuple[list[dict], list[dict] | None]] = [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}], None),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
      {"role": "assistant", "content": "d <&> \"e\"\n"}], None),
    ([{"role": "user", "content": "Only a question"}], None),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}], None),
    ([{"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": "Checking.", "tool_calls": [_call("weather", "Paris"), _call("weather", "Rome")]},
      {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"},
      {"role": "assistant", "content": "Sunny and rain."}], [_tool("weather")]),
    ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "x"},
      {"role": "assistant", "content": "", "tool_calls": [_call("search", "x", wrapped=False)]},
      {"role": "tool", "content": "found"}, {"role": "assistant", "content": "Found."}],
     [_tool("search"), _tool("weather")]),
]


def _render(tokenizer, template: str, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def renders_like_qwen(tokenizer: PreTrainedTokenizerBase, template: str) -> bool:
    """Whether `template` renders every probe conversation (with and without a generation prompt) exactly as
    Qwen2.5's template does; decided by the rendered text, never by the template's own text."""
    reference = qwen_marker_template()
    for messages, tools in PROBE_CONVERSATIONS:
        for prompt in (False, True):
            if prompt and messages[-1]["role"] == "assistant":
                continue
            try:
                if _render(tokenizer, template, messages, tools, prompt) != _render(tokenizer, reference, messages, tools, prompt):
                    return False
            except Exception:  # a template that cannot render a probe does not format like Qwen2.5
                return False
    return True


@dataclass(frozen=True)
class ChatFormat:
    training: str  # the template the stage renders with (markers where we know the layout)
    published: str  # the template the stage's output carries
    origin: str  # where it came from, for messages


def choose_chat_format(tokenizer: PreTrainedTokenizerBase, option: str = "auto", where: str = "") -> ChatFormat:
    """The training and published templates for `tokenizer` under the stage option `chat_template`.

    `auto`: the tokenizer's own template (Qwen2.5's when it has none); `qwen2.5`: Qwen2.5's; else a .jinja path.
    """
    if option == "qwen2.5":
        return ChatFormat(qwen_marker_template(), qwen_plain_template(), "qwen2.5")
    if option == "auto":
        template, origin = tokenizer.chat_template, f"{where} tokenizer".strip()
        if isinstance(template, dict):
            template = template.get("default")
    else:
        path = Path(option)
        try:
            template, origin = path.read_text(encoding="utf-8"), str(path)
        except OSError as e:
            raise UserError(f"chat_template: cannot read {path}: {e.strerror or e}") from None
    if not template:
        return ChatFormat(qwen_marker_template(), qwen_plain_template(), "qwen2.5 (the tokenizer has none)")
    if has_generation_markers(template):  # e.g. a checkpoint written before templates were published plain
        return ChatFormat(template, plain_template(template), origin)
    if renders_like_qwen(tokenizer, template):
        return ChatFormat(qwen_marker_template(), template, origin + " (renders like Qwen2.5)")
    return ChatFormat(template, template, origin)


def apply_chat_format(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat) -> PreTrainedTokenizerBase:
    tokenizer.chat_template = fmt.training
    tokenizer.published_chat_template = fmt.published  # read back by save_checkpoint
    return tokenizer


def published_template_of(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = getattr(tokenizer, "published_chat_template", None) or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return plain_template(template) if template else None


# --- reading -----------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def largest_shard_bytes(path: str | Path) -> int | None:
    """Size of the biggest safetensors file in a checkpoint folder (None when it has none)."""
    sizes = [p.stat().st_size for p in Path(path).glob("*.safetensors")]
    return max(sizes) if sizes else None


def checkpoint_dtype(path: str | Path) -> str | None:
    config = read_json(Path(path) / "config.json")
    return config.get("torch_dtype") or config.get("dtype")


def context_limit(config: dict[str, Any]) -> int | None:
    """The longest sequence a config.json can attend: the scaled length with rope scaling, else
    max_position_embeddings."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind and kind != "default" and scaling.get("factor") and scaling.get("original_max_position_embeddings"):
        return int(scaling["factor"] * scaling["original_max_position_embeddings"])
    return config.get("max_position_embeddings")


def rope_parameters(scaling: dict[str, Any], rope_theta: float) -> dict[str, Any]:
    """transformers 5's `rope_parameters` for a recipe's `rope_scaling` ({type, factor, original_max_...})."""
    params = {k: v for k, v in scaling.items() if k != "type"}
    return {"rope_type": scaling["type"], "rope_theta": rope_theta, **params}


# --- writing -----------------------------------------------------------------------------------

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _published_config(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """transformers 5's config.json plus the field names Qwen's published configs use (what engines read)."""
    config = dict(config)
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    kind = rope.get("rope_type", "default")
    if kind != "default":
        config["rope_scaling"] = {"type": kind, **{k: v for k, v in rope.items()
                                                 if k not in ("rope_type", "type", "rope_theta")}}
    else:
        config.pop("rope_scaling", None)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(endoftext, int) and endoftext != tokenizer.unk_token_id:
        config["bos_token_id"] = endoftext
    if tokenizer.eos_token_id is not None:
        config["eos_token_id"] = tokenizer.eos_token_id
    config.setdefault("use_sliding_window", False)
    if config.get("sliding_window") is None:
        config["sliding_window"] = config.get("max_position_embeddings")
    return dict(sorted(config.items()))


def _generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: Path | None):
    """The input's generation_config.json (sampling settings kept) with stop ids from the tokenizer: the end of
    an assistant turn and <|endoftext|> (Qwen2.5-Instruct: [151645, 151643])."""
    from transformers import GenerationConfig

    from ..generation import stop_token_ids

    gen = None
    if source is not None and (source / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(source)
    if gen is None:
        gen = GenerationConfig()
    stops = stop_token_ids(tokenizer)
    gen.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else None)
    gen.bos_token_id = model.config.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def write_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path, chat_template: str | None = None) -> None:
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json with the chat template inside, as
    Qwen publishes them (transformers 5 writes neither vocab/merges nor the template into the config).
    chat_template: default the one the tokenizer was loaded with, without generation markers."""
    if chat_template is None:
        chat_template = published_template_of(tokenizer)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    config = read_json(config_path)
    for noise in ("is_local", "local_files_only", "published_chat_template", "backend"):
        config.pop(noise, None)
    if chat_template:
        config["chat_template"] = chat_template
    else:
        config.pop("chat_template", None)
    if isinstance(config.get("extra_special_tokens"), list):
        # The published name; transformers 4 reads `extra_special_tokens` as a dict and would fail on a list.
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    atomic_write_json(config_path, dict(sorted(config.items())))
    backend = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    bpe = backend.get("model") or {}
    if bpe.get("type") == "BPE":
        atomic_write_json(out / "vocab.json", dict(sorted(bpe["vocab"].items(), key=lambda kv: kv[1])))
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def tie_like(state_dict: dict[str, Any], model) -> dict[str, Any]:
    """Names that share one parameter in `model` (tied embeddings) share one tensor again: a state dict gathered
    from shards holds separate copies, and save_pretrained drops only aliases."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        origin = first.setdefault(id(param), name)
        if origin != name and origin in state_dict and name in state_dict:
            state_dict[name] = state_dict[origin]
    return state_dict


def cast_floating(state_dict: dict[str, Any], dtype: str) -> dict[str, Any]:
    """`state_dict` with floating tensors cast to `dtype`; tensors sharing storage (tied weights) stay shared."""
    import torch

    target = getattr(torch, dtype)
    out, cast = {}, {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() or tensor.dtype == target:
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in cast:
            cast[key] = tensor.detach().to(target)
        out[name] = cast[key]
    return out


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    out_dtype: torch.dtype | str | None = None,
    max_shard_size: int | str | None = None,
    source: str | Path | None = None,
    chat_template: str | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write `model` + `tokenizer` to `out_dir` (atomically) in the published layout.

    out_dtype: the weights' dtype on disk (default: as trained). max_shard_size: safetensors shard limit;
    default: the largest shard of `source` (the checkpoint the stage started from, scaled to out_dtype), else
    transformers' default. chat_template: what tokenizer_config.json carries; default: the template the
    tokenizer was loaded with, without generation markers.
    """
    import torch

    out_dir = Path(out_dir)
    if hasattr(model, "merge_and_unload"):  # a peft model: ship plain weights every stage can load
        model = model.merge_and_unload()
    if isinstance(out_dtype, str):
        out_dtype = getattr(torch, out_dtype)
    # The weights written: `state_dict` when given (gathered from shards), else the model's own, cast to
    # out_dtype on the way out; the model itself stays as trained.
    if state_dict is not None:
        state_dict = tie_like(dict(state_dict), model)
    if out_dtype is not None and (state_dict is not None or model.dtype != out_dtype):
        state_dict = cast_floating(state_dict if state_dict is not None else model.state_dict(),
                                   str(out_dtype).removeprefix("torch."))
    disk_dtype = out_dtype or model.dtype
    source_path = Path(source) if source is not None and is_checkpoint(source) else None
    if max_shard_size is None and source_path is not None:
        biggest = largest_shard_bytes(source_path)
        in_dtype = checkpoint_dtype(source_path)
        if biggest:
            ratio = disk_dtype.itemsize / getattr(torch, in_dtype).itemsize if in_dtype in DTYPE_NAMES else 1
            max_shard_size = int(biggest * ratio)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    if model.can_generate():
        model.generation_config = _generation_config(model, tokenizer, source_path)
    template = chat_template if chat_template is not None else published_template_of(tokenizer)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, **kwargs)
        config_path = tmp / "config.json"
        config = {**read_json(config_path), "dtype": str(disk_dtype).removeprefix("torch.")}
        atomic_write_json(config_path, _published_config(config, tokenizer))
        write_tokenizer(tokenizer, tmp, template)
    return out_dir


# --- loading -------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, chat_template: str = "auto") -> PreTrainedTokenizerBase:
    """A checkpoint's (or tokenizer folder's) tokenizer, set up with the stage's training template; the
    template its output will carry is kept beside it (see `choose_chat_format`)."""
    from ..tokenizer import load_tokenizer as load_tokenizer_folder

    tokenizer = load_tokenizer_folder(path)
    fmt = choose_chat_format(tokenizer, chat_template, where=str(path))
    log.info("chat template: %s", fmt.origin)
    return apply_chat_format(tokenizer, fmt)


def load_pretrained(path: str | Path, model_cls, *, dtype, attn_implementation: str, num_labels: int | None = None,
                    rope_scaling: dict[str, Any] | None = None, **from_pretrained_kwargs) -> PreTrainedModel:
    """`model_cls.from_pretrained` on a checkpoint folder (published or ours), with the stage's rope scaling
    (`from_pretrained_kwargs`: e.g. a quantization config)."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path / 'config.json'}: cannot load the model config: {first_line}") from None
    if rope_scaling:
        theta = (config.rope_parameters or {}).get("rope_theta", getattr(config, "rope_theta", 10_000.0))
        config.rope_parameters = rope_parameters(rope_scaling, theta)
    if num_labels is not None:
        config.num_labels = num_labels
    config._attn_implementation = attn_implementation
    try:
        return model_cls.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn_implementation,
                                         local_files_only=True, **from_pretrained_kwargs)
    except OSError as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot load the model weights: {first_line}") from None
