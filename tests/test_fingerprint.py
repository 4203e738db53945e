"""A stage's config hash follows the contents of its inputs, not their paths: an edited file re-runs the
stage, the same files copied elsewhere do not."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from helpers import arithmetic_rows, write_jsonl

from qwen_align import fingerprint as fp
from qwen_align.errors import DataError
from qwen_align.fingerprint import Fingerprints
from qwen_align.fsutil import atomic_write_json
from qwen_align.recipe import load_recipe
from qwen_align.runner import config_hashes, run_recipe

HELDOUT = {"messages": [{"role": "user", "content": "What is 2+2?"}], "verifier": "exact", "answer": "4"}


def make_project(root, demo_tokenizer_dir):
    """A recipe folder with every kind of input a stage hashes: data file, data folder, system prompts,
    task_eval, and a checkpoint folder as `init_from`."""
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "sft.jsonl", arithmetic_rows(4))
    (root / "shards" / "b").mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "shards" / "a.jsonl", arithmetic_rows(2))
    write_jsonl(root / "shards" / "b" / "c.jsonl", arithmetic_rows(2, start=30))
    (root / "system.txt").write_text("Be brief.\n")
    write_jsonl(root / "heldout.jsonl", [HELDOUT])
    ckpt = root / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": "run", "seed": 0, "stages": [{
        "name": "sft", "kind": "sft", "init_from": "ckpt",
        "data": {"sources": [{"path": "sft.jsonl"}, {"path": "shards"}], "system_prompts": "system.txt"},
        "task_eval": {"path": "heldout.jsonl"}}]}
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return root


def hash_of(root) -> str:
    """What the runner records for the stage (its inputs, and a later stage's view of it as its upstream)."""
    recipe = load_recipe(root / "recipe.yaml")
    return config_hashes(recipe)["sft"]


@pytest.fixture
def project(tmp_path, demo_tokenizer_dir):
    return make_project(tmp_path / "a", demo_tokenizer_dir)


def test_same_inputs_copied_elsewhere_hash_alike(project, tmp_path):
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(project, copy)
    assert hash_of(copy) == hash_of(project)


@pytest.mark.parametrize("edit", [
    lambda r: write_jsonl(r / "sft.jsonl", arithmetic_rows(4, start=11)),  # same size, other content
    lambda r: write_jsonl(r / "shards" / "b" / "c.jsonl", arithmetic_rows(3, start=30)),  # deep in a folder
    lambda r: write_jsonl(r / "shards" / "b" / "d.jsonl", arithmetic_rows(1)),  # a file added to a folder
    lambda r: (r / "shards" / "a.jsonl").rename(r / "shards" / "z.jsonl"),  # same bytes, another name
    lambda r: (r / "system.txt").write_text("Be kind.\n"),
    lambda r: write_jsonl(r / "heldout.jsonl", [{**HELDOUT, "answer": "5"}]),
    lambda r: (r / "ckpt" / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 16})),
    lambda r: (r / "ckpt" / "model.safetensors").write_bytes(b"\0" * 128),
], ids=["data file", "folder file", "folder added", "folder renamed", "system prompts", "task_eval",
        "checkpoint config", "checkpoint weights size"])
def test_an_edited_input_changes_the_hash(project, edit):
    before = hash_of(project)
    edit(project)
    assert hash_of(project) != before


def test_hidden_files_and_weight_bytes_do_not_count(project):
    """A folder's hidden files (editor swap files, temporaries) are not inputs; a checkpoint's weights count
    by size only (documented: cheap on a 72B checkpoint)."""
    before = hash_of(project)
    (project / "shards" / ".a.jsonl.swp").write_text("junk")
    (project / "ckpt" / "model.safetensors").write_bytes(b"\1" * 64)
    assert hash_of(project) == before


def test_file_digests_are_cached_in_the_run_dir(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(3))
    reads = []
    real = fp.sha256_file
    monkeypatch.setattr(fp, "sha256_file", lambda p: reads.append(p) or real(p))
    first = Fingerprints(tmp_path / "run_dir_absent")  # no folder: nothing written, nothing fails
    first.of(str(data))
    first.save()
    (tmp_path / "run").mkdir()
    a = Fingerprints(tmp_path / "run")
    digest = a.of(str(data))
    a.save()
    assert Fingerprints(tmp_path / "run").of(str(data)) == digest and len(reads) == 2  # the third run read nothing
    st = data.stat()
    write_jsonl(data, arithmetic_rows(3, start=12))  # same size: the new mtime tells it apart
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert Fingerprints(tmp_path / "run").of(str(data)) != digest and len(reads) == 3


def test_edited_data_reruns_a_completed_stage(project):
    """Through the runner: unchanged inputs skip the completed stage; a data file edited in place runs it again
    (here it stops at once on the edit's bad last row, which proves it was not skipped)."""
    recipe = load_recipe(project / "recipe.yaml")
    run_dir = project / "run"
    run_dir.mkdir()
    (run_dir / "sft" / "final").mkdir(parents=True)
    atomic_write_json(run_dir / "manifest.json", {"stages": {"sft": {
        "status": "completed", "output": str(run_dir / "sft" / "final"), "config_hash": hash_of(project)}}})
    cwd = os.getcwd()
    os.chdir(project)  # run_dir is relative to where the command runs
    try:
        run_recipe(recipe)  # skipped: nothing to do
        with open(project / "sft.jsonl", "a") as f:
            f.write(json.dumps({"messages": []}) + "\n")
        with pytest.raises(DataError, match=r"sft\.jsonl:5: "):
            run_recipe(load_recipe(project / "recipe.yaml"))
    finally:
        os.chdir(cwd)
    assert (run_dir / "fingerprints.json").is_file()
