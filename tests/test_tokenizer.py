"""Tokenizer: Qwen2.5 ids from qwen.tiktoken, the chat template's exact text and assistant mask, the demo tokenizer."""

from __future__ import annotations

import importlib.util
import json

import pytest

from qwen_align import tokenizer as qt
from qwen_align.errors import UserError

HAS_DASHSCOPE = importlib.util.find_spec("dashscope") is not None
needs_qwen_vocab = pytest.mark.skipif(not HAS_DASHSCOPE, reason="qwen.tiktoken comes with dashscope")

DEFAULT_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_TOOL_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
)
TOOLS_BLOCK = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + WEATHER_TOOL_JSON
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)


def _call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [_call("Paris"), _call("Rome")]},
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "Paris is sunny, Rome is rainy."},
]
MULTI_TURN = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

DEMO_TEXTS = [
    "The quick brown fox jumps over the lazy dog. 12345 + 67890 = 80235",
    "What is 17 * 23? It is 391. Hello there, see you.",
    "你好世界，我们来学习数学。",
    "def add(a, b):\n    return a + b\n",
] * 10


@pytest.fixture(scope="module")
def qwen():
    if not HAS_DASHSCOPE:
        pytest.skip("qwen.tiktoken comes with dashscope")
    return qt.build_qwen25_tokenizer()


@pytest.fixture(scope="module")
def demo():
    return qt.train_demo_tokenizer(DEMO_TEXTS, vocab_size=400)


def render(tok, messages, tools=None, add_generation_prompt=False) -> str:
    return tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def assistant_runs(tok, messages, tools=None) -> list[str]:
    """Decode each contiguous run of tokens the assistant mask marks."""
    out = tok.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    runs, current = [], []
    for token_id, marked in zip(ids, mask):
        if marked:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    # Every run is followed by the unmarked newline that ends the turn.
    ends = [i for i in range(1, len(mask)) if mask[i - 1] and not mask[i]]
    assert len(ends) == len(runs) and all(tok.decode([ids[i]]) == "\n" for i in ends)
    return [tok.decode(run) for run in runs]


# --- constants --------------------------------------------------------------------------------


def test_control_tokens_listing():
    assert len(qt.CONTROL_TOKENS) == 22 == len(set(qt.CONTROL_TOKENS))
    assert qt.CONTROL_TOKENS[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert qt.CONTROL_TOKENS[-1] == "<|file_sep|>"
    assert qt.NON_SPECIAL_CONTROL_TOKENS < set(qt.CONTROL_TOKENS)


def test_pattern_splits_digits_and_letters():
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert qt.QWEN2_PRETOKENIZE_PATTERN == PRETOKENIZE_REGEX

    split = pre_tokenizers.Split(Regex(qt.QWEN2_PRETOKENIZE_PATTERN), behavior="isolated")
    pieces = [piece for piece, _ in split.pre_tokenize_str("I'll pay $1234 now!\n\n  ok")]
    assert pieces == ["I", "'ll", " pay", " $", "1", "2", "3", "4", " now", "!\n\n", " ", " ok"]


# --- the Qwen2.5 tokenizer ----------------------------------------------------------------------

# Expected ids published with Qwen2 tokenizers: llama.cpp's models/ggml-vocab-qwen2.gguf.{inp,out},
# transformers' tests/models/qwen2/test_tokenization_qwen2.py, and Qwen2.5-Instruct usage examples.
KNOWN_IDS = {
    "Hello world!": [9707, 1879, 0],
    "Hello, world!": [9707, 11, 1879, 0],
    " Hello World!": [21927, 4337, 0],
    "ied 4 ½ months": [1122, 220, 19, 220, 26062, 3951],
    "Führer": [37, 50753, 261],
    " ": [220],
    "   ": [262],
    "\t": [197],
    "\n\n": [271],
    "\t\n": [1572],
    "    Hello\n    Hello": [262, 21927, 198, 262, 21927],
    "\n =": [198, 284],
    "' era": [6, 11385],
    "333333333": [18] * 9,
    " this is 🦙.cpp": [419, 374, 11162, 99, 247, 13, 10821],
    "w048 7tuijk dsdfhu": [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739],
    "нещо на Български": [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012],
    "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～": [
        9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257,
        16, 18, 16, 19, 16, 20, 16, 35727, 21216,
    ],
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)": [
        145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8,
        25521, 227, 320, 3243, 42365, 429, 702, 1181, 1828, 3950, 8,
    ],
    "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。": [
        144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830,
        98841, 104034, 104949, 9370, 5333, 58143, 102011, 1773,
    ],
    '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```': [
        73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274,
        16948, 34841, 3135, 1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594,
    ],
    "write a quick sort algorithm.": [4934, 264, 3974, 3378, 12111, 13],
    "Here is the code:<|im_end|>\n": [8420, 374, 279, 2038, 25, 151645, 198],
    "<|im_start|>hello<|im_end|>": [151644, 14990, 151645],
}


@needs_qwen_vocab
@pytest.mark.parametrize("text", list(KNOWN_IDS))
def test_known_qwen_ids(qwen, text):
    assert qwen.encode(text, add_special_tokens=False) == KNOWN_IDS[text]


@needs_qwen_vocab
def test_matches_tiktoken_on_random_text(qwen):
    # tiktoken's own BPE over the same ranks is the reference the merges were derived from.
    tiktoken = pytest.importorskip("tiktoken")
    import random
    import unicodedata

    ranks = qt.read_tiktoken_ranks(qt.default_tiktoken_path())
    reference = tiktoken.Encoding("qwen", pat_str=qt.QWEN2_PRETOKENIZE_PATTERN, mergeable_ranks=ranks, special_tokens={})
    rng = random.Random(0)
    alphabets = [(0x20, 0x7E), (0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x400, 0x4FF),
                 (0x600, 0x6FF), (0x1F300, 0x1FAFF), (0x300, 0x36F), (0x30, 0x39), (0xA0, 0x17F)]  # fmt: skip
    pieces = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "'s", "'LL", " the", "ing"]
    texts = [MIXED_TEXT]
    for _ in range(2000):
        chars = [
            rng.choice(pieces) if rng.random() < 0.25 else chr(rng.randint(*rng.choice(alphabets)))
            for _ in range(rng.randint(1, 40))
        ]
        texts.append(unicodedata.normalize("NFC", "".join(chars)))
    for token in qt.CONTROL_TOKENS:  # the reference has no control tokens
        texts = [t.replace(token, "") for t in texts]
    ours = [e.ids for e in qwen.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert ours == reference.encode_ordinary_batch(texts)


@needs_qwen_vocab
def test_known_chat_prompt_ids(qwen):
    # Qwen2.5-Instruct's rendering of a Chinese prompt, as printed in public examples.
    messages = [{"role": "user", "content": "写一段描写春天的散文"}]
    ids = qwen.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == [
        151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264,
        10950, 17847, 13, 151645, 198, 151644, 872, 198, 61443, 104383, 109478, 105303, 9370, 110401,
        151645, 198, 151644, 77091, 198,
    ]


@needs_qwen_vocab
def test_qwen_settings(qwen):
    assert len(qwen) == 151665
    assert qwen.eos_token == "<|im_end|>" and qwen.eos_token_id == 151645
    assert qwen.pad_token == "<|endoftext|>" and qwen.pad_token_id == 151643
    assert qwen.bos_token is None
    assert qwen.model_max_length == 131072
    assert qwen.chat_template == qt.QWEN_CHAT_TEMPLATE
    assert qwen.encode("hi", add_special_tokens=True) == qwen.encode("hi", add_special_tokens=False)


@needs_qwen_vocab
def test_control_token_ids_and_flags(qwen):
    decoder = qwen.added_tokens_decoder
    for offset, token in enumerate(qt.CONTROL_TOKENS):
        token_id = qt.FIRST_CONTROL_TOKEN_ID + offset
        assert qwen.convert_tokens_to_ids(token) == token_id
        assert decoder[token_id].content == token
        assert decoder[token_id].special == (token not in qt.NON_SPECIAL_CONTROL_TOKENS)
        # Never split, even glued to text.
        ids = qwen.encode(f"a{token}b", add_special_tokens=False)
        assert token_id in ids and len(ids) == 3


@needs_qwen_vocab
def test_skip_special_tokens_keeps_tool_call_markers(qwen):
    ids = qwen.encode("<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>", add_special_tokens=False)
    assert qwen.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>\n{}\n</tool_call>"


MIXED_TEXT = (
    "混合文本：你好，世界！ 🦙🚀👩\u200d💻 naïve café — ½ × 3.14159\n"
    "def area(r: float) -> float:\n\treturn 3.14159 * r ** 2  # 1234567890\n"
    "  \r\n\n مرحبا Привет 안녕하세요 ¯\\_(ツ)_/¯ <|im_end|> <tool_call>"
)


@needs_qwen_vocab
def test_decode_round_trip(qwen):
    ids = qwen.encode(MIXED_TEXT, add_special_tokens=False)
    assert qwen.decode(ids) == MIXED_TEXT
    assert [qwen.decode([i]) for i in qwen.encode("2024", add_special_tokens=False)] == ["2", "0", "2", "4"]


@needs_qwen_vocab
def test_save_and_autotokenizer_round_trip(qwen, tmp_path):
    from transformers import AutoTokenizer

    out = qt.save_tokenizer(qwen, tmp_path / "tok")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    # One merge per non-byte token, in the order of Qwen's merges.txt.
    merges = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) == 151643 - 256
    assert merges[:8] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r", "ĠĠ Ġ", "o n"]
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert loaded.encode(MIXED_TEXT) == qwen.encode(MIXED_TEXT)
    assert loaded.chat_template == qt.QWEN_CHAT_TEMPLATE
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert {i: t.special for i, t in loaded.added_tokens_decoder.items()} == {
        i: t.special for i, t in qwen.added_tokens_decoder.items()
    }
    again = qt.load_tokenizer(out)
    assert render(again, TOOL_CONVERSATION, [WEATHER_TOOL]) == render(qwen, TOOL_CONVERSATION, [WEATHER_TOOL])


@needs_qwen_vocab
def test_qwen_assistant_mask(qwen):
    assert assistant_runs(qwen, MULTI_TURN) == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert assistant_runs(qwen, TOOL_CONVERSATION, [WEATHER_TOOL]) == [
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "Paris is sunny, Rome is rainy.<|im_end|>",
    ]


def test_missing_dashscope_is_a_user_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        qt.importlib.util, "find_spec", lambda name, *a: None if name == "dashscope" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install 'qwen-align\[tokenizer\]' or pass --tiktoken PATH"):
        qt.build_qwen25_tokenizer()


def test_bad_tiktoken_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        qt.build_qwen25_tokenizer(tmp_path / "missing.tiktoken")
    garbled = tmp_path / "garbled.tiktoken"
    garbled.write_text("IQ== 0\nnot base64!! x\n")
    with pytest.raises(UserError, match=r"garbled.tiktoken:2"):
        qt.build_qwen25_tokenizer(garbled)
    small = tmp_path / "small.tiktoken"
    small.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(UserError, match="not Qwen's qwen.tiktoken"):
        qt.build_qwen25_tokenizer(small)


# --- the chat template --------------------------------------------------------------------------
# Expected strings are what Qwen2.5-Instruct's own template renders for the same messages.


def test_template_default_system(demo):
    assert render(demo, [{"role": "user", "content": "Hi"}]) == DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n"


def test_template_given_system(demo):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(demo, messages) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_template_generation_prompt(demo):
    assert render(demo, [{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_multi_turn(demo):
    assert render(demo, MULTI_TURN) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_template_tools(demo):
    user = [{"role": "user", "content": "Weather in Paris?"}]
    tail = "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    assert render(demo, user, [WEATHER_TOOL], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        + TOOLS_BLOCK
        + tail
    )
    with_system = [{"role": "system", "content": "Be brief."}, *user]
    assert render(demo, with_system, [WEATHER_TOOL], add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief." + TOOLS_BLOCK + tail
    )


def test_template_tool_calls_and_responses(demo):
    assert render(demo, TOOL_CONVERSATION, [WEATHER_TOOL]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        + TOOLS_BLOCK
        + "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nParis is sunny, Rome is rainy.<|im_end|>\n"
    )


def test_template_tool_call_without_content_or_function_wrapper(demo):
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"q": 1}}]},
        {"role": "tool", "content": "r"},
    ]
    assert render(demo, messages) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nx<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"q": 1}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nr\n</tool_response><|im_end|>\n"
    )


def test_generation_markers_add_no_text(demo):
    # Qwen's template with the markers stripped must render the same.
    plain = qt.QWEN_CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert "{%- generation" not in plain and "endgeneration" not in plain
    for messages, tools in [(MULTI_TURN, None), (TOOL_CONVERSATION, [WEATHER_TOOL])]:
        marked = render(demo, messages, tools)
        assert demo.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=plain) == marked


# --- the demo tokenizer ---------------------------------------------------------------------------


def test_demo_layout(demo):
    assert len(demo) <= 400
    first_control = len(demo) - len(qt.CONTROL_TOKENS)
    for offset, token in enumerate(qt.CONTROL_TOKENS):
        assert demo.convert_tokens_to_ids(token) == first_control + offset
        assert demo.encode(f"x{token}y", add_special_tokens=False)[1] == first_control + offset
    assert (demo.eos_token, demo.pad_token, demo.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert demo.chat_template == qt.QWEN_CHAT_TEMPLATE


def test_demo_digits_are_single_tokens(demo):
    tokens = demo.tokenize("12345 + 67890 = 80235")
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digits == list("1234567890" + "80235")
    assert demo.decode(demo.encode("391 = 17 * 23")) == "391 = 17 * 23"


def test_demo_is_deterministic(demo):
    again = qt.train_demo_tokenizer(DEMO_TEXTS, vocab_size=400)
    assert again.backend_tokenizer.to_str() == demo.backend_tokenizer.to_str()


def test_demo_round_trip_and_mask(demo, tmp_path):
    assert demo.decode(demo.encode(MIXED_TEXT)) == MIXED_TEXT  # bytes cover anything
    assert assistant_runs(demo, MULTI_TURN) == ["Hello!<|im_end|>", "4<|im_end|>"]
    loaded = qt.load_tokenizer(qt.save_tokenizer(demo, tmp_path / "demo"))
    assert loaded.encode(MIXED_TEXT) == demo.encode(MIXED_TEXT)
    assert assistant_runs(loaded, TOOL_CONVERSATION, [WEATHER_TOOL])[-1] == "Paris is sunny, Rome is rainy.<|im_end|>"


def test_demo_vocab_size_too_small():
    with pytest.raises(UserError, match="at least 278"):
        qt.train_demo_tokenizer(["abc"], vocab_size=100)


# --- loading ------------------------------------------------------------------------------------


def test_load_rejects_non_tokenizer_dirs(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        qt.load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a tokenizer directory"):
        qt.load_tokenizer(tmp_path / "empty")


def test_load_fills_chat_template_and_pad(demo, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=demo.backend_tokenizer, eos_token="<|im_end|>", bos_token=None)
    bare.save_pretrained(str(tmp_path / "bare"))
    loaded = qt.load_tokenizer(tmp_path / "bare")
    assert loaded.chat_template == qt.QWEN_CHAT_TEMPLATE
    assert loaded.pad_token == "<|endoftext|>"


def test_load_pads_with_eos_without_endoftext(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token=None).save_pretrained(
        str(tmp_path / "w")
    )
    assert qt.load_tokenizer(tmp_path / "w").pad_token == "</s>"


@needs_qwen_vocab
def test_cli_tokenizer_build_writes_a_loadable_folder(tmp_path, capsys):
    from transformers import AutoTokenizer

    from qwen_align.cli import main

    assert main(["tokenizer", "build", "--out", str(tmp_path / "tok")]) == 0
    assert "[9707, 1879, 0]" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok("Hello world!")["input_ids"] == [9707, 1879, 0]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]


def test_cli_tokenizer_build_bad_ranks_file_is_one_line(tmp_path, capsys):
    from qwen_align.cli import main

    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 !!\n")
    assert main(["tokenizer", "build", "--out", str(tmp_path / "tok"), "--tiktoken", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.tiktoken" in err and "\n" not in err
    assert not (tmp_path / "tok").exists()
