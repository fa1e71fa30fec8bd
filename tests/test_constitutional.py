"""Stage ``constitutional``: constitution loading, verdict parsing (pure), contrast and critique-and-revise
logic with a scripted sampler (malformed JSON included), kill-and-resume, one real run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_synthesis.constitutional import load_constitution, parse_revision, parse_verdicts, pick_target
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
from posttrain.core.sampling.scripted import ScriptedSampler

ROOT = Path(__file__).resolve().parents[1]
CONST = ROOT / "recipes/data/constitution.yaml"


def run_recipe(tmp_path: Path, stages: list[dict], sampler, out: str = "out") -> dict:
    """Run stages through Recipe (with an injected sampler); return the manifests."""
    data = {"output_dir": str(tmp_path / out), "seed": 0, "stages": stages}
    return recipe_from_dict(data, tmp_path / "recipe.yaml").run(sampler=sampler)


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    rows = [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"Question number {i}?"}]} for i in range(4)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


# ---------------------------------------------------------------- pure parts

def test_shipped_constitution_loads():
    name, ps = load_constitution(CONST)
    assert name == "example-assistant"
    assert {p.kind for p in ps} == {"follow", "avoid"} and len({p.id for p in ps}) == len(ps) == 6


@pytest.mark.parametrize("text,msg", [
    ("follow:\n  - {id: a, text: x}\n  - {id: a, text: y}\n", r"c.yaml: follow\[1\].id: duplicate principle id 'a'"),
    ("avoid:\n  - {id: a}\n", r"c.yaml: avoid\[0\]: expected exactly the keys 'id' and 'text'"),
    ("follow: {id: a}\n", r"c.yaml: follow: expected a list"),
    ("rules: []\n", r"c.yaml: rules: unknown key"),
    ("name: empty\n", r"c.yaml: the constitution has no principles"),
])
def test_bad_constitution_one_line_errors(tmp_path, text, msg):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=msg):
        load_constitution(p)


def test_parse_verdicts_majority_and_malformed():
    ids = {"a", "b", "c"}
    assert parse_verdicts(["nonsense", '{"violated": ["a"'], ids) is None  # no valid vote
    assert parse_verdicts(['{"violated": []}'], ids) == []
    assert parse_verdicts(['```json\n{"violated": ["a", "zzz"]}\n```'], ids) == ["a"]  # unknown id ignored
    votes = ['{"violated": ["a", "b"]}', '{"violated": ["a"]}', "garbage", '{"violated": ["c"]}']
    assert parse_verdicts(votes, ids) == ["a"]  # a: 2 of 3 valid votes; b, c: 1 of 3


def test_parse_revision_and_pick_target():
    assert parse_revision('{"critique": "rude", "revision": "Kind answer."}') == ("rude", "Kind answer.")
    assert parse_revision('{"critique": "rude"}') is None
    # the shared lenient JSON reader (data_synthesis.common) takes a Python-literal reply too
    assert parse_revision("{'revision': 'x'}") == ("", "x")
    _, ps = load_constitution(CONST)
    picks = {pick_target(f"q{i}", ps, 0).id for i in range(40)}
    assert pick_target("q1", ps, 0) == pick_target("q1", ps, 0) and len(picks) > 3  # reproducible, spread


# ---------------------------------------------------------------- contrast, scripted

def contrast_reply(prompt, j):
    text = prompt[-1]["content"]
    if "RESPONSE TO CHECK:" in text:  # the model check
        resp = text.split("RESPONSE TO CHECK:\n")[1].split("\n\nWhich principles")[0]
        if "Question number 3" in text:
            return "I think it is fine"  # malformed verdict for every response of q3
        if resp.startswith("GOOD"):
            return '{"violated": []}'
        if "number 2" in text:
            return '{"violated": []}'  # the check does not confirm q2's violator
        return "```json\n" + json.dumps({"violated": [resp.split(":")[1]]}) + "\n```"
    if prompt[0]["role"] == "system" and "negative example" in prompt[0]["content"]:
        # the violator names the principle it was told to break, so the check can confirm it
        from data_synthesis.constitutional import load_constitution
        _, ps = load_constitution(CONST)
        pid = next(p.id for p in ps if p.text in prompt[0]["content"])
        return f"BAD:{pid}: a reply to {text}"
    return f"GOOD answer to {text}"


def test_contrast_stage_scripted(tmp_path, prompts):
    m = run_recipe(tmp_path, [{"kind": "constitutional", "constitution": str(CONST), "prompts": str(prompts),
                               "judge_votes": 1}], ScriptedSampler(contrast_reply))
    s = m["constitutional"]["summary"]
    assert s["prompts"] == 4 and s["responses"] == 8 and s["check_malformed"] == 2
    assert s["followers_confirmed"] == 3 and s["violators_confirmed"] == 2
    demos = read_records(tmp_path / "out/constitutional/demonstrations.jsonl", "demonstration")
    prefs = read_records(tmp_path / "out/constitutional/preferences.jsonl", "preference")
    assert len(demos) == 3 and len(prefs) == 2
    _, ps = load_constitution(CONST)
    for d in demos:
        assert d["messages"][-1]["content"].startswith("GOOD") and d["messages"][0]["role"] == "user"  # no constitution prompt kept
        assert d["meta"]["principle_ids"] == sorted(p.id for p in ps)
    for p in prefs:
        assert p["chosen"][0]["content"].startswith("GOOD") and p["rejected"][0]["content"].startswith("BAD")
        assert p["meta"]["violated_principle"] == pick_target(p["meta"]["prompt_id"], ps, 0).id
        assert p["meta"]["violated_principle"] in p["meta"]["rejected_violates"]
    assert {p["meta"]["prompt_id"] for p in prefs} == {"q0", "q1"}


def test_contrast_restricted_targets_and_unknown_id(tmp_path, prompts):
    m = run_recipe(tmp_path, [{"kind": "constitutional", "constitution": str(CONST), "prompts": str(prompts),
                               "violate": ["demeaning"]}], ScriptedSampler(contrast_reply))
    prefs = read_records(tmp_path / "out/constitutional/preferences.jsonl", "preference")
    assert prefs and {p["meta"]["violated_principle"] for p in prefs} == {"demeaning"}
    assert m["constitutional"]["summary"]["preferences"] == len(prefs)
    with pytest.raises(ValueError, match=r"violate: unknown principle id\(s\) \['nope'\]"):
        run_recipe(tmp_path, [{"kind": "constitutional", "constitution": str(CONST), "prompts": str(prompts),
                               "violate": ["nope"]}], ScriptedSampler(contrast_reply), out="bad")


# ---------------------------------------------------------------- critique and revise, scripted

def revise_reply(prompt, j):
    text = prompt[-1]["content"]
    if "RESPONSE TO CHECK:" in text:
        resp = text.split("RESPONSE TO CHECK:\n")[1].split("\n\nWhich principles")[0]
        return '{"violated": ["demeaning", "respectful"]}' if resp.startswith("RUDE") else '{"violated": []}'
    if "First critique it" in text:
        if "number 2" in text:
            return '{"critique": "rude", "revision": '  # malformed
        return json.dumps({"critique": "It mocks the user.", "revision": "POLITE answer."})
    return "RUDE answer, silly you." if text.endswith(("1?", "2?")) else "Plain answer."


def test_revise_stage_scripted(tmp_path, prompts):
    m = run_recipe(tmp_path, [{"kind": "constitutional", "constitution": str(CONST), "prompts": str(prompts),
                               "mode": "revise"}], ScriptedSampler(revise_reply))
    s = m["constitutional"]["summary"]
    assert s["initial_clean"] == 2 and s["initial_breached"] == 2 and s["revise_malformed"] == 1
    assert s["revisions_confirmed"] == 1 and s["demonstrations"] == 3 and s["preferences"] == 1
    (p,) = read_records(tmp_path / "out/constitutional/preferences.jsonl", "preference")
    assert p["chosen"][0]["content"] == "POLITE answer." and p["rejected"][0]["content"].startswith("RUDE")
    assert p["meta"]["rejected_violates"] == ["demeaning", "respectful"] and p["meta"]["critique"] == "It mocks the user."


# ---------------------------------------------------------------- kill and resume

class Crashing:
    """Wraps a sampler; raises on generate call number ``crash_at`` (1-based), counts calls."""

    name = "crashing"

    def __init__(self, inner, crash_at: int | None):
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    def generate(self, prompts, params, seeds=None):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise RuntimeError("killed")
        return self.inner.generate(prompts, params, seeds)

    def close(self):
        pass


@pytest.mark.parametrize("mode,reply,crash_at,calls", [("contrast", contrast_reply, 2, 2), ("revise", revise_reply, 3, 4)])
def test_kill_and_resume(tmp_path, prompts, mode, reply, crash_at, calls):
    stages = [{"kind": "constitutional", "constitution": str(CONST), "prompts": str(prompts), "mode": mode}]
    ref = Crashing(ScriptedSampler(reply), None)
    run_recipe(tmp_path, stages, ref, out="clean")
    assert ref.calls == calls
    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(tmp_path, stages, Crashing(ScriptedSampler(reply), crash_at), out="resumed")
    out, clean = tmp_path / "resumed/constitutional", tmp_path / "clean/constitutional"
    # the steps before the crash are committed; no records are written before the end
    done = {p.name for p in (out / "steps").glob("*.jsonl") if p.read_text()}
    assert len(done) == crash_at - 1 and all(
        (out / "steps" / n).read_text() == (clean / "steps" / n).read_text() for n in done)
    assert not (out / "demonstrations.jsonl").exists() and not (out / "preferences.jsonl").exists()
    again = Crashing(ScriptedSampler(reply), None)
    run_recipe(tmp_path, stages, again, out="resumed")
    assert again.calls == calls - crash_at + 1  # finished steps came from the cache
    # every step cache holds each item once, the same as the uninterrupted run's: nothing lost, no duplicates
    assert sorted(p.name for p in (out / "steps").glob("*.jsonl")) == sorted(p.name for p in (clean / "steps").glob("*.jsonl"))
    for p in (clean / "steps").glob("*.jsonl"):
        want = [json.loads(x) for x in p.read_text().splitlines()]
        got = [json.loads(x) for x in (out / "steps" / p.name).read_text().splitlines()]
        assert len({r["k"] for r in got}) == len(got) and want
        assert sorted(got, key=lambda r: r["k"]) == sorted(want, key=lambda r: r["k"]), p.name
    for f in ("demonstrations.jsonl", "preferences.jsonl"):
        got = [json.loads(x) for x in (out / f).read_text().splitlines()]
        want = read_records(clean / f)
        assert len({r["id"] for r in got}) == len(got) and want
        assert sorted(got, key=lambda r: r["id"]) == sorted(want, key=lambda r: r["id"])


# ---------------------------------------------------------------- real tiny model through vLLM

def test_constitutional_real_vllm(tmp_path, prompts, vllm_sampler):
    m = run_recipe(tmp_path, [{"kind": "constitutional", "constitution": str(CONST), "prompts": str(prompts),
                               "require_stop": False, "judge_votes": 2,
                               "min_success_rate": 0,  # the random tiny model writes no readable verdict
                               "sampling": {"temperature": 0.8, "max_tokens": 24, "seed": 0},
                               "judge_sampling": {"temperature": 0.8, "max_tokens": 16, "seed": 0}}], vllm_sampler)
    s = m["constitutional"]["summary"]
    assert s["prompts"] == 4 and s["responses"] == 8
    steps = tmp_path / "out/constitutional/steps"
    checked = [json.loads(x) for x in (steps / "check.jsonl").read_text().splitlines()]
    assert len(checked) == 8 - s["responses_dropped"] and all(len(c["v"]) == 2 for c in checked)  # 2 votes each
    # tiny-model verdicts are nonsense: unreadable checks confirm nothing, so records <= confirmed counts
    assert s["demonstrations"] == s["followers_confirmed"] <= 4
    assert s["check_malformed"] + s["followers_confirmed"] + s["violators_confirmed"] <= len(checked)
    assert s["preferences"] <= s["violators_confirmed"]
    assert (tmp_path / "out/constitutional/demonstrations.jsonl").exists()
