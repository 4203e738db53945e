"""Benchmark loaders read each released format (JSONL, JSON, Parquet, save_to_disk, nested folders) and stop
on bad input with one line naming file and row. The shared RMB release files load as published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_jsonl

from qwen_align.errors import DataError
from qwen_align.rm_eval import load_benchmark

SHARED_RMB = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "rmb"


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_rewardbench_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "filtered.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "subset": "alpacaeval-easy", "id": 1},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm", "id": 2},
    ])
    items, load = load_benchmark("rewardbench", f)
    assert load == {"rows": 2, "skipped": {}, "items": 2}
    assert items[0].prompt == [{"role": "user", "content": "Hi?"}] and items[0].responses == ["Hello!", "Go away."]
    assert items[1].pairwise and items[1].id == "2"


def test_rewardbench2_parquet_best_of_4_and_ties_ids(tmp_path):
    rows = [
        {"id": "7", "prompt": "q", "chosen": ["a"], "rejected": ["b", "c", "d"], "subset": "Math", "num_correct": 1},
        {"id": "tied:3", "prompt": "q", "chosen": ["a", "a2"], "rejected": ["b"], "subset": "Ties", "num_correct": 2},
    ]
    items, _ = load_benchmark("rewardbench2", write_parquet(tmp_path / "test.parquet", rows))
    assert items[0].responses == ["a", "b", "c", "d"] and items[0].num_correct == 1 and not items[0].pairwise
    assert items[1].num_correct == 2
    bad = write_parquet(tmp_path / "bad.parquet", [{**rows[1], "id": "3"}])
    with pytest.raises(DataError, match=r"bad\.parquet\[0\]: a Ties row's id"):
        load_benchmark("rewardbench2", bad)


def _rmb_release(root: Path) -> Path:
    conv = [{"role": "user", "content": "Hi", "language": "English"}, {"role": "assistant", "content": "Yes?",
            "language": "English"}, {"role": "user", "content": "Help me", "language": "English"}]
    pair = root / "Pairwise_set" / "Helpfulness" / "Chat"
    bon = root / "BoN_set" / "Harmlessness"
    pair.mkdir(parents=True)
    bon.mkdir(parents=True)
    (pair / "Discussion.json").write_text(json.dumps([{
        "pair_uid": "1", "conversation_input": conv, "chosen": {"llm_name": "x", "answer": "Sure."},
        "reject": {"llm_name": "y", "answer": "No."}, "category_path": "Pairwise_set/Helpfulness/Chat/Discussion"}]))
    (bon / "S1.json").write_text(json.dumps([{
        "bon_uid": "b1", "conversation_input": conv[:1], "bon_best": {"llm_name": "x", "answer": "I can't."},
        "loser_list": [{"llm_name": "y", "answer": "Here is how."}, {"llm_name": "z", "answer": "OK."}],
        "category_path": "BoN_set/Harmlessness/S1"}]))
    return root


def test_rmb_release_folder_recursive(tmp_path):
    items, load = load_benchmark("rmb", _rmb_release(tmp_path / "RMB_dataset"))
    assert load["items"] == 2
    bon, pair = items  # path order: BoN_set before Pairwise_set
    assert bon.responses == ["I can't.", "Here is how.", "OK."] and not bon.pairwise and bon.id == "b1"
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"] and "language" not in pair.prompt[0]
    assert pair.extra["category_path"] == "Pairwise_set/Helpfulness/Chat/Discussion"


@pytest.mark.skipif(not SHARED_RMB.is_dir(), reason="shared RMB release files not present")
def test_shared_rmb_files_load_as_released():
    counts = {}
    for f in sorted(SHARED_RMB.glob("*.json")):
        items, load = load_benchmark("rmb", f)
        counts[f.name] = load["items"]
        assert all(len(it.responses) >= 2 and it.prompt[-1]["role"] == "user" for it in items)
    assert counts == {
        "BoN_set__Harmlessness__S1.json": 111, "BoN_set__Helpfulness__Code__Documentation.json": 15,
        "Pairwise_set__Harmlessness__S1.json": 459, "Pairwise_set__Helpfulness__Chat__Discussion.json": 293,
    }


def test_ppe_human_preference_and_correctness(tmp_path):
    human = write_jsonl(tmp_path / "human.jsonl", [
        {"question_id": "q1", "prompt": "p", "response_1": "A", "response_2": "B", "winner": "model_b"},
        {"question_id": "q2", "prompt": "p", "response_1": "A", "response_2": "B", "winner": "tie"},
    ])
    items, load = load_benchmark("ppe", human)
    assert len(items) == 1 and items[0].responses == ["B", "A"] and load["skipped"] == {"human preference ties": 1}
    folder = tmp_path / "ppe" / "gpqa_best_of_k"
    folder.mkdir(parents=True)
    write_parquet(folder / "train.parquet", [{"question_id": "g1", "prompt": "p", "response_1": "w", "response_2": "r1",
                                              "response_3": "r2", "scores": [False, True, True],
                                              "sampled_conflict_pairs": [[0, 1]]}])
    items, _ = load_benchmark("ppe", tmp_path / "ppe")
    assert items[0].subset == "GPQA" and items[0].responses == ["r1", "r2", "w"] and items[0].num_correct == 2
    assert items[0].extra == {"order": [1, 2, 0], "conflict_pairs": [[0, 1]]}


def test_pairs_from_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "1+1?"}], "chosen": [{"role": "assistant", "content": "2"}],
         "rejected": [{"role": "assistant", "content": "3"}]},
    ]).save_to_disk(str(tmp_path / "ds"))
    items, _ = load_benchmark("pairs", tmp_path / "ds")
    assert items[0].prompt == [{"role": "user", "content": "1+1?"}] and items[0].responses == ["2", "3"]


def test_bad_input_names_file_and_row(tmp_path):
    f = write_jsonl(tmp_path / "rb.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b", "subset": "s"}, {"prompt": "p", "chosen": "a", "subset": "s"},
    ])
    with pytest.raises(DataError, match=r"rb\.jsonl:2: missing 'rejected'"):
        load_benchmark("rewardbench", f)
    rmb = _rmb_release(tmp_path / "rmb")
    with pytest.raises(DataError, match=r"\.json\[0\]: missing 'prompt'"):  # wrong benchmark format
        load_benchmark("rewardbench", rmb)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        load_benchmark("rmb", tmp_path / "empty")
    with pytest.raises(DataError, match="cannot tell which PPE correctness set"):
        load_benchmark("ppe", write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response_1": "a", "scores": [1]}]))
