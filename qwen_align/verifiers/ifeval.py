"""`ifeval` verifier: IFEval-style verifiable instructions, checked by if-verifiable's IFEval checkers.

A row names its instructions as IFEval does: `instruction_id_list` (e.g. `["punctuation:no_comma",
"length_constraints:number_words"]`) and `kwargs`, a list of dicts aligned with the ids (`None` values are
ignored, as in the released IFEval data). score = fraction of instructions followed (strict: the response
as written, no loose variants); passed = all followed. An unknown id or kwargs a checker does not take stop
with a DataError naming them.

Offline note: two checkers tokenise with NLTK — `length_constraints:number_sentences` (Punkt sentence
splitter) and `change_case:capital_word_frequency` (`word_tokenize`). Both want the `punkt_tab` data,
which NLTK never downloads by itself and which is not installed here. When it is missing, those two
checkers use NLTK's data-free equivalents instead (an untrained `PunktSentenceTokenizer`, and
`word_tokenize(..., preserve_line=True)`); counts can differ from the trained splitter on abbreviations
("Dr. Smith"). Install the data (`python -m nltk.downloader punkt_tab`, or point `NLTK_DATA` at a copy) to
get IFEval's exact behaviour. Nothing here downloads anything.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

from ..errors import DataError
from . import VerifyResult

log = logging.getLogger(__name__)

_setup_lock = threading.Lock()
_registry: dict[str, type] | None = None


def _have_punkt() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


def _instruction_registry() -> dict[str, type]:
    """IFEval's id -> checker class, with data-free tokenisers when NLTK's punkt data is absent."""
    global _registry
    with _setup_lock:
        if _registry is None:
            import langdetect
            from if_verifiable.ifeval import instructions_util
            from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

            langdetect.DetectorFactory.seed = 0  # langdetect is random unless seeded
            if not _have_punkt():
                _use_data_free_tokenisers(instructions_util)
            _registry = dict(INSTRUCTION_DICT)
    return _registry


def _use_data_free_tokenisers(util) -> None:
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    log.info("NLTK punkt_tab data not found: IFEval sentence/word counts use NLTK's data-free tokenisers")
    splitter = PunktSentenceTokenizer()
    util._get_sentence_tokenizer = lambda: splitter
    # Only if-verifiable's module sees this stand-in; the global `nltk` stays untouched.
    util.nltk = SimpleNamespace(
        tokenize=nltk.tokenize,
        word_tokenize=lambda text, language="english": nltk.word_tokenize(text, language, preserve_line=True),
    )


def _instructions(example: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    ids = example.get("instruction_id_list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError("verifier 'ifeval' needs 'instruction_id_list', a non-empty list of instruction ids")
    kwargs = example.get("kwargs")
    if kwargs is None:
        kwargs = [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) or k is None for k in kwargs):
        raise DataError(f"verifier 'ifeval': 'kwargs' must be a list of {len(ids)} objects, one per instruction id")
    return [(i, {k: v for k, v in (kw or {}).items() if v is not None}) for i, kw in zip(ids, kwargs)]


def row_problem(example: dict[str, Any]) -> str | None:
    """Why `example` cannot be checked (unknown id, malformed kwargs), or None; no response needed."""
    try:
        _build_checkers(example)
    except DataError as e:
        return str(e)
    return None


def _prompt_text(example: dict[str, Any]) -> str:
    if isinstance(example.get("prompt"), str):
        return example["prompt"]
    users = [m.get("content", "") for m in example.get("messages") or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def _build_checkers(example: dict[str, Any]) -> list[tuple[str, Any]]:
    registry = _instruction_registry()
    checkers = []
    for instruction_id, kwargs in _instructions(example):
        cls = registry.get(instruction_id)
        if cls is None:
            raise DataError(f"verifier 'ifeval': unknown instruction id {instruction_id!r}")
        checker = cls(instruction_id)
        try:
            checker.build_description(**kwargs)
            args = checker.get_instruction_args()
            if args and "prompt" in args:
                checker.build_description(prompt=_prompt_text(example))
        except (TypeError, ValueError) as e:
            raise DataError(f"verifier 'ifeval': bad kwargs {kwargs} for {instruction_id!r} ({e})") from None
        checkers.append((instruction_id, checker))
    return checkers


def check_ifeval(example: dict[str, Any], response: str) -> VerifyResult:
    checkers = _build_checkers(example)
    if not response or not response.strip():
        return VerifyResult(False, 0.0, "empty response")
    failed = [i for i, checker in checkers if not checker.check_following(response)]
    score = (len(checkers) - len(failed)) / len(checkers)
    if not failed:
        return VerifyResult(True, 1.0, f"follows all {len(checkers)} instructions")
    return VerifyResult(False, score, "does not follow: " + ", ".join(failed))
