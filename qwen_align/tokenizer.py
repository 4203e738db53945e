"""Qwen2.5 tokenizer: control tokens, chat template, building from qwen.tiktoken, a tiny demo tokenizer.

The Qwen2.5 tokenizer is a byte-level BPE (the GPT-2 bytes-to-unicode trick) over 151,643 ranked
byte strings, followed by 22 control tokens at ids 151643..151664.  `build_qwen25_tokenizer` rebuilds
it from the `qwen.tiktoken` rank file that ships with the `dashscope` package, so no model hub
download is needed; the ids it produces are Qwen2.5's ("Hello world!" -> [9707, 1879, 0]).
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2TokenizerFast

from qwen_align.errors import UserError
from qwen_align.fsutil import atomic_dir

# --- control tokens -------------------------------------------------------------------------

# Qwen2.5's control tokens, in id order: CONTROL_TOKENS[i] has id FIRST_CONTROL_TOKEN_ID + i.
CONTROL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
FIRST_CONTROL_TOKEN_ID = 151643

# Qwen2.5-Instruct's tokenizer_config.json marks these "special": false.  They are still single,
# never-split tokens, but decode(skip_special_tokens=True) keeps them, so a decoded tool call
# still reads "<tool_call>...</tool_call>".
NON_SPECIAL_CONTROL_TOKENS: frozenset[str] = frozenset(CONTROL_TOKENS[CONTROL_TOKENS.index("<tool_call>") :])

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 131072

# Qwen's "additional_special_tokens": the special control tokens except <|endoftext|> (eos included).
_EXTRA_SPECIAL_TOKENS = [t for t in CONTROL_TOKENS if t not in NON_SPECIAL_CONTROL_TOKENS and t != PAD_TOKEN]

# Qwen2's pre-tokenizer split: contractions, letters with at most one leading non-letter,
# every digit on its own, punctuation runs (with trailing newlines), newline runs, other spaces.
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN_TIKTOKEN_RANKS = FIRST_CONTROL_TOKEN_ID  # qwen.tiktoken holds ranks 0..151642

# --- chat template --------------------------------------------------------------------------

# Renders exactly like Qwen2.5-Instruct's template.  Differences are in structure only:
# `{% generation %}` marks what the assistant writes (its reply, tool calls and <|im_end|>, not the
# newline after it) for `return_assistant_tokens_mask`; the markers add no text.
QWEN_CHAT_TEMPLATE = r"""
{%- set default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." %}
{%- if messages and messages[0].role == "system" %}
    {%- set system_text = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = default_system %}
    {%- set turns = messages %}
{%- endif %}
{%- if tools %}
    {{- "<|im_start|>system\n" + system_text }}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" + (tool | tojson) }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments" }}
    {{- " within <tool_call></tool_call> XML tags:\n<tool_call>\n" }}
    {{- "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {{- "<|im_start|>system\n" + system_text + "<|im_end|>\n" }}
{%- endif %}
{%- for message in turns %}
    {%- if message.role == "user" or message.role == "system" %}
        {{- "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n" }}
    {%- elif message.role == "assistant" %}
        {{- "<|im_start|>assistant\n" }}
        {%- generation %}
            {%- if message.tool_calls %}
                {%- if message.content %}
                    {{- message.content + "\n" }}
                {%- endif %}
                {%- for tool_call in message.tool_calls %}
                    {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
                    {%- if not loop.first %}
                        {{- "\n" }}
                    {%- endif %}
                    {{- "<tool_call>\n{\"name\": \"" + call.name + "\", \"arguments\": " }}
                    {{- (call.arguments | tojson) + "}\n</tool_call>" }}
                {%- endfor %}
            {%- else %}
                {{- message.content }}
            {%- endif %}
            {{- "<|im_end|>" }}
        {%- endgeneration %}
        {{- "\n" }}
    {%- elif message.role == "tool" %}
        {#- Consecutive tool results share one user turn. #}
        {%- if loop.first or loop.previtem.role != "tool" %}
            {{- "<|im_start|>user" }}
        {%- endif %}
        {{- "\n<tool_response>\n" + message.content + "\n</tool_response>" }}
        {%- if loop.last or loop.nextitem.role != "tool" %}
            {{- "<|im_end|>\n" }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|im_start|>assistant\n" }}
{%- endif %}
""".strip()

# --- building the Qwen2.5 tokenizer -----------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()


def _as_vocab_string(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def default_tiktoken_path() -> Path:
    """Where dashscope keeps qwen.tiktoken; found without importing dashscope (its client is heavy)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "building the Qwen2.5 tokenizer needs qwen.tiktoken from the dashscope package: "
            "pip install 'qwen-align[tokenizer]' or pass --tiktoken PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise UserError(f"dashscope is installed but {path} is missing; reinstall it or pass --tiktoken PATH")
    return path


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one `base64(token) rank` pair per line."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"cannot read tiktoken file {path}: {e.strerror or e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(f"{path}:{lineno}: expected 'BASE64TOKEN RANK', got {line[:60]!r}") from None
    return ranks


def _check_qwen_ranks(ranks: dict[bytes, int], path: Path) -> None:
    # The control token ids are fixed at 151643.., so the ranks must fill 0..151642 exactly.
    if sorted(ranks.values()) != list(range(QWEN_TIKTOKEN_RANKS)):
        raise UserError(
            f"{path} is not Qwen's qwen.tiktoken: expected ranks 0..{QWEN_TIKTOKEN_RANKS - 1} "
            f"once each, got {len(ranks)} tokens"
        )
    if sum(1 for token in ranks if len(token) == 1) != 256:
        raise UserError(f"{path} is not a byte-level BPE vocabulary: not all 256 single bytes have a rank")


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """Run tiktoken's BPE on `token` using only lower-ranked merges; the two parts left are its merge.

    tiktoken has no merge list: it repeatedly joins the adjacent pair whose concatenation has the
    lowest rank.  A merge `a b` ranked like `a+b` reproduces that exactly in a merges-based BPE.
    """
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_at = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best_rank:
                best_rank, best_at = rank, i
        if best_at < 0:
            return None  # unreachable token: no merge sequence builds it
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) == 1:
            continue
        pair = _last_merge(token, ranks)
        if pair is None:
            raise UserError(f"tiktoken token {token!r} (rank {ranks[token]}) cannot be built by merging lower ranks")
        merges.append((_as_vocab_string(pair[0]), _as_vocab_string(pair[1])))
    return merges


def _set_qwen_pipeline(tok: Tokenizer) -> None:
    """Qwen2's normalizer, pre-tokenizer and decoder (the same pipeline Qwen2Tokenizer builds)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            # The regex above already split the text; ByteLevel only maps bytes to characters.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()


def _control_added_tokens() -> list[AddedToken]:
    return [
        AddedToken(t, special=t not in NON_SPECIAL_CONTROL_TOKENS, normalized=False, single_word=False)
        for t in CONTROL_TOKENS
    ]


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Give a backend with the control tokens already added the Qwen2.5 transformers settings."""
    # Qwen2TokenizerFast so the saved tokenizer_class is "Qwen2Tokenizer", which AutoTokenizer maps back.
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        extra_special_tokens=list(_EXTRA_SPECIAL_TOKENS),
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=QWEN_CHAT_TEMPLATE,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )


def build_qwen25_tokenizer(tiktoken_path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Rebuild the Qwen2.5 tokenizer from qwen.tiktoken (dashscope's copy unless a path is given)."""
    path = Path(tiktoken_path) if tiktoken_path is not None else default_tiktoken_path()
    ranks = read_tiktoken_ranks(path)
    _check_qwen_ranks(ranks, path)
    vocab = {_as_vocab_string(token): rank for token, rank in ranks.items()}
    backend = Tokenizer(BPE(vocab=vocab, merges=_merges_from_ranks(ranks), fuse_unk=False, byte_fallback=False))
    _set_qwen_pipeline(backend)
    # Added in id order, so they land on 151643..151664 right after the BPE vocabulary.
    backend.add_tokens(_control_added_tokens())
    return _wrap(backend)


# --- a small tokenizer for the CPU demo -----------------------------------------------------


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE on `texts` with Qwen's pipeline, control tokens and chat template.

    Ids: 0..255 are the 256 byte tokens, then the learned merges, and the 22 control tokens come
    last, in CONTROL_TOKENS order -- the same layout as Qwen2.5, only smaller.  `vocab_size` counts
    the control tokens too, so len(tokenizer) <= vocab_size (less when the texts run out of merges).
    Training is deterministic: the same texts give the same tokenizer.
    """
    n_bpe = vocab_size - len(CONTROL_TOKENS)
    if n_bpe < 256:
        raise UserError(
            f"demo tokenizer vocab_size must be at least {256 + len(CONTROL_TOKENS)} "
            f"(256 bytes + {len(CONTROL_TOKENS)} control tokens), got {vocab_size}"
        )
    backend = Tokenizer(BPE(fuse_unk=False, byte_fallback=False))
    _set_qwen_pipeline(backend)
    trainer = BpeTrainer(
        vocab_size=n_bpe,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens(_control_added_tokens())
    return _wrap(backend)


# --- saving and loading -----------------------------------------------------------------------


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> Path:
    """Write `tokenizer` to `out_dir` (replacing it atomically); return the directory."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory; fill in Qwen's chat template and a pad token when it has none."""
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise UserError(f"{path} is not a tokenizer directory (no tokenizer_config.json or tokenizer.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load the tokenizer in {path}: {first_line}") from e
    if not tokenizer.chat_template:
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        if PAD_TOKEN in tokenizer.get_vocab():
            tokenizer.pad_token = PAD_TOKEN
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
