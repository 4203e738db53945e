"""Data: every local format, file:line errors, skip-and-count, seeded weighted mixing, system prompt pool."""

from __future__ import annotations

import json

import datasets
import pytest

from qwen_align.data import (
    LoadReport, add_system_prompts, iter_rows, load_conversations, load_training_rows, mix_sources,
)
from qwen_align.errors import DataError
from qwen_align.recipe import DataConfig, DataSource

from helpers import arithmetic_rows, write_jsonl

ROWS = arithmetic_rows(5)


def test_reads_jsonl_json_parquet_and_saved_datasets(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "e"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "f"))
    for name in ["a.jsonl", "b.json", "c.json", "d.parquet", "e", "f"]:
        rows = [r.data for r in iter_rows(tmp_path / name)]
        assert [r["messages"] for r in rows] == [r["messages"] for r in ROWS], name
    assert len(list(iter_rows(tmp_path / "f", split="test"))) == 1
    with pytest.raises(DataError, match="no split 'dev'"):
        list(iter_rows(tmp_path / "f", split="dev"))


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"messages": [\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        list(iter_rows(p))


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"text": "hi"}, "missing 'messages'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role is 'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content must be a string"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ],
)
def test_bad_rows_stop_with_origin_or_are_skipped_and_counted(tmp_path, row, reason):
    p = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row, ROWS[1]])
    with pytest.raises(DataError, match=rf"d.jsonl:2: {reason}"):
        load_conversations(p)
    report = LoadReport()
    kept = load_conversations(p, on_bad_rows="skip", report=report)
    assert len(kept) == 2 and report.skipped_bad == 1 and "d.jsonl:2" in report.bad_examples[0]


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl: data file not found"):
        list(iter_rows(tmp_path / "nothere.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data format '.csv'"):
        list(iter_rows(tmp_path / "x.csv"))


def test_weighted_mix_is_seeded_and_sized_by_weight():
    a = [{"id": f"a{i}"} for i in range(10)]
    b = [{"id": f"b{i}"} for i in range(10)]
    mixed = mix_sources([(a, 0.5), (b, 2.0)], seed=3)
    assert sum(r["id"].startswith("a") for r in mixed) == 5
    assert sum(r["id"].startswith("b") for r in mixed) == 20
    assert mixed == mix_sources([(a, 0.5), (b, 2.0)], seed=3)
    assert mixed != mix_sources([(a, 0.5), (b, 2.0)], seed=4)


def test_system_prompt_pool_only_fills_missing_system_messages():
    rows = [dict(r) for r in arithmetic_rows(200)]
    rows[0] = {"messages": [{"role": "system", "content": "keep me"}, *rows[0]["messages"]]}
    added = add_system_prompts(rows, ["S1", "S2"], probability=0.5, seed=0)
    assert 60 < added < 140  # about half of the 199 without one
    assert rows[0]["messages"][0]["content"] == "keep me"
    systems = {r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "system"}
    assert systems == {"keep me", "S1", "S2"}


def test_load_training_rows_reports(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [*ROWS, {"oops": 1}])
    (tmp_path / "sys.txt").write_text("Be brief.\n\nBe kind.\n")
    cfg = DataConfig(
        sources=[DataSource(path=str(p), weight=2)], on_bad_rows="skip", system_prompts=str(tmp_path / "sys.txt"),
    )
    rows, report = load_training_rows(cfg, seed=0)
    assert len(rows) == 10 and report["bad_rows_skipped"] == 1 and report["system_prompts_added"] == 10


def test_a_mistyped_relative_file_is_not_taken_for_a_hub_name(tmp_path):
    from qwen_align.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(
        "model: tiny\nrun_dir: r\nstages:\n  - name: sft\n    kind: sft\n    data: {sources: [{path: data/sft.jsonl}]}\n"
    )
    path = load_recipe(tmp_path / "r.yaml").stages[0].data.sources[0].path
    assert path == str(tmp_path / "data" / "sft.jsonl")
    with pytest.raises(DataError, match="data file not found"):
        list(iter_rows(path))


def test_folder_of_shards_reads_every_data_file_in_order_and_skips_temporaries(tmp_path):
    shards = tmp_path / "out"
    (shards / "sub").mkdir(parents=True)
    write_jsonl(shards / "part-00001.jsonl", ROWS[2:])
    write_jsonl(shards / "part-00000.jsonl", ROWS[:2])
    write_jsonl(shards / ".part-00002.jsonl.tmp", ROWS)  # a half-written shard
    (shards / "stats.txt").write_text("not data")
    rows = [r.data for r in iter_rows(shards)]
    assert rows == ROWS
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="folder holds no data files"):
        list(iter_rows(empty))


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
        ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be text"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, "text pairs need 'prompt' as text"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]},
         "'chosen' must be a non-empty list"),
        ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
         "whole conversations ending with an assistant turn"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "the answers ending with an assistant turn"),
        ({"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}, "text pairs need 'prompt'"),
    ],
)
def test_preference_rows_are_checked(tmp_path, row, reason):
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    p = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    cfg = DataConfig(sources=[DataSource(path=str(p))])
    with pytest.raises(DataError, match=rf"pairs.jsonl:2: .*{reason}"):
        load_training_rows(cfg, seed=0, kind="preference")
    rows, report = load_training_rows(cfg.model_copy(update={"on_bad_rows": "skip"}), seed=0, kind="preference")
    assert rows == [good] and report["bad_rows_skipped"] == 1


def test_prompt_rows_must_end_before_the_answer(tmp_path):
    p = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "q"}], "verifier": "exact"},
                                                 ROWS[0]])
    with pytest.raises(DataError, match="prompts.jsonl:2: the prompt's last message is an assistant turn"):
        load_training_rows(DataConfig(sources=[DataSource(path=str(p))]), seed=0, kind="prompt")
