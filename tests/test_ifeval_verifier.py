"""`ifeval` verifier: IFEval instructions checked by if-verifiable's checkers, offline."""

from __future__ import annotations

import pytest

from qwen_align.errors import DataError
from qwen_align.verifiers import verify


def row(ids, kwargs, prompt="Write something."):
    return {"messages": [{"role": "user", "content": prompt}], "verifier": "ifeval",
            "instruction_id_list": ids, "kwargs": kwargs}


def test_all_instructions_followed():
    example = row(
        ["punctuation:no_comma", "length_constraints:number_words", "detectable_format:title",
         "change_case:english_lowercase", "keywords:existence"],
        [{}, {"num_words": 5, "relation": "at least"}, {}, {}, {"keywords": ["apple"]}],
    )
    result = verify(example, "<<my title>> i like an apple a day and more")
    assert result.passed and result.score == 1.0


def test_score_is_the_fraction_followed():
    example = row(["punctuation:no_comma", "keywords:existence", "length_constraints:number_words"],
                  [{}, {"keywords": ["pear"]}, {"num_words": 3, "relation": "less than"}])
    result = verify(example, "apples, bananas and cherries")
    assert not result.passed
    assert result.score == pytest.approx(0.0)
    result = verify(example, "a pear")
    assert result.passed and result.score == 1.0
    result = verify(example, "pear, yes")
    assert not result.passed and result.score == pytest.approx(2 / 3)
    assert "punctuation:no_comma" in result.reason


def test_nltk_backed_checkers_run_offline():
    # number_sentences and capital_word_frequency need NLTK tokenisers; no download may happen.
    example = row(["length_constraints:number_sentences", "change_case:capital_word_frequency"],
                  [{"num_sentences": 2, "relation": "at least"}, {"capital_frequency": 2, "capital_relation": "at least"}])
    assert verify(example, "Hello THERE friend. I AM here. Bye.").passed
    assert not verify(example, "just one sentence here").passed


def test_none_kwargs_are_ignored_and_kwargs_may_be_absent():
    example = row(["punctuation:no_comma"], [{"num_words": None, "relation": None}])
    assert verify(example, "fine").passed
    example = {**row(["punctuation:no_comma"], None)}
    assert verify(example, "fine").passed


def test_prompt_dependent_checker_reads_the_user_message():
    example = row(["combination:repeat_prompt"], [{"prompt_to_repeat": "Say hi."}], prompt="Say hi.")
    assert verify(example, "Say hi. Hi!").passed
    assert not verify(example, "Hi!").passed


def test_empty_response_fails():
    assert not verify(row(["punctuation:no_comma"], [{}]), " ").passed


def test_unknown_instruction_is_a_data_error_naming_it():
    with pytest.raises(DataError, match="'made_up:thing'"):
        verify(row(["punctuation:no_comma", "made_up:thing"], [{}, {}]), "x")


@pytest.mark.parametrize("ids, kwargs, match", [
    ([], [], "instruction_id_list"),
    (["punctuation:no_comma"], [{}, {}], "kwargs"),
    (["punctuation:no_comma"], [{"bogus": 1}], "bad kwargs"),
])
def test_malformed_rows_are_data_errors(ids, kwargs, match):
    with pytest.raises(DataError, match=match):
        verify(row(ids, kwargs), "x")
