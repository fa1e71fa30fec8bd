"""Stage respond: several responses per instruction from several generators, recorded with their source."""

from __future__ import annotations

import json

from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
from posttrain.core.sampling.scripted import ScriptedSampler


def test_respond_stage_builds_tasks_with_labels(tmp_path):
    inp = tmp_path / "ins.jsonl"
    with open(inp, "w") as f:
        for i, t in enumerate(["Say hi.", "Count to three.", "Echo."]):
            f.write(json.dumps({"id": f"i{i}", "prompt": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": t}]}) + "\n")

    def answer(prompt, j):
        t = prompt[-1]["content"]
        return "same" if t == "Echo." else f"{t} answer {j}"

    data = {"output_dir": str(tmp_path / "run"), "stages": [{
        "kind": "respond", "input": str(inp),
        "generators": [{"label": "greedy", "sampling": {"n": 1, "temperature": 0.0, "max_tokens": 16}},
                       {"label": "hot", "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 16}}]}]}
    s = ScriptedSampler(answer)
    st = recipe_from_dict(data, tmp_path / "r.yaml").run(sampler=s)["respond"]["summary"]
    assert [len(c) for c in s.calls] == [3, 3]  # one call per generator, all instructions at once
    assert st["tasks"] == 2 and st["skipped_too_few"] == 1  # "Echo." has one distinct response
    tasks = read_records(tmp_path / "run" / "respond" / "tasks.jsonl")
    t = tasks[0]
    assert t["id"] == "i0" and t["prompt"][0]["role"] == "system"
    # the hot sampler's first answer repeats the greedy one: deduplicated
    assert [r["label"] for r in t["responses"]] == ["greedy", "hot"]
    assert [r["text"] for r in t["responses"]] == ["Say hi. answer 0", "Say hi. answer 1"]
    assert t["responses"][1]["sampling"]["temperature"] == 1.0 and t["responses"][0]["sampler"] == "scripted"
    assert len({r["id"] for r in t["responses"]}) == len(t["responses"])
    assert st["per_generator"] == {"greedy": 2, "hot": 2} and st["responses"] == 4
