"""One real run of instag -> select -> evolve -> respond on the tiny model through the vLLM backend.

The tiny model writes nonsense, so this checks plumbing, counts and records, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_synthesis.annotate.store import load_tasks
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "instructions.jsonl"


def test_annotation_chain_on_tiny_model_with_vllm(vllm_sampler, tmp_path):
    data = {
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "stages": [
            # the random tiny model rarely writes a parseable tag list: min_success_rate 0 lets the chain run
            {"kind": "instag", "input": str(DATA), "limit": 8, "max_retries": 1, "min_success_rate": 0,
             "sampling": {"temperature": 0.0, "max_tokens": 48}},
            {"kind": "select", "input": "@instag/records.jsonl", "budget": 4},
            {"kind": "evolve", "input": "@select/records.jsonl", "rounds": 2, "max_chars": 2000,
             "sampling": {"temperature": 0.9, "max_tokens": 48, "seed": 1}},
            {"kind": "respond", "input": "@evolve/records.jsonl",
             "generators": [{"label": "greedy", "sampling": {"n": 1, "temperature": 0.0, "max_tokens": 24}},
                            {"label": "hot", "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 24, "seed": 3}}]},
        ]}
    res = recipe_from_dict(data, tmp_path / "r.yaml").run(sampler=vllm_sampler)
    out = tmp_path / "run"

    tag = res["instag"]["summary"]
    assert tag["instructions"] == 8 and tag["tagged"] + tag["failed"] == 8
    raw = read_records(out / "instag" / "records.jsonl")  # meta.instag: the raw tags, attempts, failure flag
    assert len(raw) == 8 and all(r["source"] == "instag:vllm" for r in raw)
    # every failure was re-asked once (max_retries=1), every success used 1 or 2 attempts
    assert all(r["meta"]["instag"]["attempts"] == (2 if r["meta"]["instag"]["failed"] else r["meta"]["instag"]["attempts"])
               for r in raw)
    onto = json.loads((out / "instag" / "ontology.json").read_text())
    assert [s["step"] for s in onto["steps"]] == ["raw", "frequency", "rule", "semantic", "association"]

    sel = res["select"]["summary"]
    assert sel["before"]["instructions"] == 8 and sel["after"]["instructions"] == 4
    chosen = read_records(out / "select" / "records.jsonl")
    assert len(chosen) == 4 and len({r["id"] for r in chosen}) == 4

    ev = res["evolve"]["summary"]
    assert ev["inputs"] == 4
    r1, r2 = ev["rounds"]
    assert r1["attempted"] == 4 and r1["kept"] + r1["failed"] == 4
    assert r2["attempted"] == r1["kept"] and r2["kept"] + r2["failed"] == r2["attempted"]
    assert ev["records"] == 4 + r1["kept"] + r2["kept"] and ev["failed"] == r1["failed"] + r2["failed"]
    evolved = read_records(out / "evolve" / "records.jsonl")
    ids = {r["id"] for r in evolved}
    assert all(r["meta"]["evolve"]["parent_id"] in ids for r in evolved if r["meta"]["evolve"]["level"] > 0)

    rs = res["respond"]["summary"]
    assert rs["instructions"] == len(evolved)
    assert rs["tasks"] + rs["skipped_too_few"] == len(evolved)
    if rs["tasks"]:
        tasks = load_tasks(out / "respond")  # what `posttrain annotate serve` loads
        assert all(2 <= len(t["responses"]) <= 3 for t in tasks)
        assert {r["label"] for t in tasks for r in t["responses"]} <= {"greedy", "hot"}
        assert all(r["sampler"] == "vllm" for t in tasks for r in t["responses"])
