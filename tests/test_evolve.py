"""Stage evolve: output checks, cleaning, rounds with parent ids and levels, failures counted and dropped."""

from __future__ import annotations

import json

import pytest

from data_synthesis.evolve import check_evolution, clean_output, pick_operation
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
from posttrain.core.sampling.scripted import ScriptedSampler

P = "Write a poem about the sea."


@pytest.mark.parametrize("child, reason", [
    ("Write a poem about the sea in exactly four rhyming stanzas, for children.", None),
    ("", "empty"),
    ("ok", "empty"),
    ("Write a poem about the sea.", "unchanged"),
    ("write a poem about the sea", "unchanged"),
    ("Write a poem about the sea " + "please " * 10, "degenerate"),
    ("Write a poem about the sea. " + "x" * 30, "degenerate"),
    ("#Rewritten Prompt#: Write a poem about the sea at night.", "leak"),
    ("Here is the rewritten instruction: Write a poem about the stormy sea.", "leak"),
    ("I added a constraint: write a poem about the sea in 8 lines.", "leak"),
    ("Write a poem about the sea. " + "Mention a different fish species in every line. " * 20, "too_long"),
    ("@@@ ### $$$ %%% ^^^ &&& *** ((( )))", "degenerate"),
    ("Write a poem about the sea\u0015 and the boat\ufffd fish.", "degenerate"),
])
def test_check_evolution(child, reason):
    assert check_evolution(P, child, max_chars=600) == reason


def test_check_evolution_truncated_and_leak_terms_in_parent():
    assert check_evolution(P, "Write a long poem about the sea and its fish.", truncated=True) == "too_long"
    parent = "Improve the given prompt so that it is clearer."
    assert check_evolution(parent, "Improve the given prompt so that it is clearer and at most 50 words.") is None


def test_clean_output():
    assert clean_output("Rewritten instruction: Do X in 3 steps.") == "Do X in 3 steps."
    assert clean_output('"Do X in 3 steps."') == "Do X in 3 steps."
    assert clean_output("```\nDo X.\n```") == "Do X."
    assert clean_output("<<<\nDo X.\n>>>") == "Do X."
    assert clean_output('Say "hi" to "Bob".') == 'Say "hi" to "Bob".'


def test_pick_operation_is_deterministic_and_varied():
    ops = ["add_constraints", "deepen", "concretize"]
    assert pick_operation(ops, 0, "x", 1) == pick_operation(ops, 0, "x", 1)
    assert len({pick_operation(ops, 0, f"id{i}", 1) for i in range(30)}) == 3


def evolver(prompt, j):
    """Known outputs: good evolutions, except a leak for 'joke' parents and unchanged for 'colors' ones."""
    text = prompt[-1]["content"].split("<<<\n")[1].split("\n>>>")[0]
    if "joke" in text:
        return text + " About cats. (Compared with the given prompt, I added a topic.)"
    if "colors" in text:
        return text
    return f"Rewritten instruction: {text} Answer in at most {40 + len(text) % 7} words and cite one example."


def _run(tmp_path, sampler, **stage):
    inp = tmp_path / "ins.jsonl"
    with open(inp, "w") as f:
        for i, t in enumerate(["Write a poem about the sea.", "Tell me a joke.", "Name three colors."]):
            f.write(json.dumps({"id": f"i{i}", "prompt": [{"role": "user", "content": t}]}) + "\n")
    data = {"output_dir": str(tmp_path / "run"), "stages": [{"kind": "evolve", "input": str(inp), "rounds": 2, **stage}]}
    return recipe_from_dict(data, tmp_path / "r.yaml").run(sampler=sampler)["evolve"]["summary"]


def test_evolve_stage_rounds_levels_and_failures(tmp_path):
    s = ScriptedSampler(evolver)
    st = _run(tmp_path, s)
    assert [len(c) for c in s.calls] == [3, 1]  # round 2 evolves only the survivor of round 1
    assert st["rounds"][0]["kept"] == 1 and st["rounds"][0]["failed"] == 2
    assert st["failed_by_reason"] == {"leak": 1, "unchanged": 1}
    assert st["per_level"] == {"0": 3, "1": 1, "2": 1}
    recs = read_records(tmp_path / "run" / "evolve" / "records.jsonl")
    by_level = {r["meta"]["evolve"]["level"]: r for r in recs if r["meta"]["evolve"]["root_id"] == "i0"}
    assert by_level[1]["meta"]["evolve"]["parent_id"] == "i0"
    assert by_level[2]["meta"]["evolve"]["parent_id"] == by_level[1]["id"]
    assert by_level[2]["prompt"][0]["content"].startswith("Write a poem about the sea. Answer in at most")
    assert not by_level[1]["prompt"][0]["content"].startswith("Rewritten")
    assert sum(v["attempted"] for v in st["per_operation"].values()) == 4
    failed = read_records(tmp_path / "run" / "evolve" / "failed.jsonl")
    assert {f["meta"]["reason"] for f in failed} == {"leak", "unchanged"}


def test_evolve_resumes_without_resampling(tmp_path):
    s = ScriptedSampler(evolver)
    _run(tmp_path, s)
    out = tmp_path / "run" / "evolve"
    first = {f: read_records(out / f) for f in ("records.jsonl", "failed.jsonl")}
    (out / "manifest.json").unlink()  # as if killed before the manifest
    s2 = ScriptedSampler(evolver)
    st = _run(tmp_path, s2)
    assert s2.calls == []  # kept and failed evolutions are both remembered (step caches)
    assert st["records"] == 5 and st["rounds"][0]["attempted"] == 3
    for step, n in (("round1", 3), ("round2", 1)):  # each model call cached once, none added by the re-run
        keys = [json.loads(x)["k"] for x in (out / "steps" / f"{step}.jsonl").read_text().splitlines()]
        assert len(keys) == len(set(keys)) == n
    for f, recs in first.items():  # the same records as the first run, no duplicates
        again = read_records(out / f)
        assert again == recs and len({r["id"] for r in again}) == len(again)


def test_evolve_without_originals(tmp_path):
    st = _run(tmp_path, ScriptedSampler(evolver), keep_original=False, operations=["deepen"])
    assert st["per_level"] == {"1": 1, "2": 1} and list(st["per_operation"]) == ["deepen"]
