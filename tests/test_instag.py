"""Stage instag: lenient parsing, normalisation on hand-made tag lists, stage logic and kill-and-resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_synthesis import tag_norm
from data_synthesis.instag import parse_tags
from data_synthesis.tag_norm import (association_aggregate, auto_min_frequency, normalize_tags, rule_aggregate,
                                     rule_key, semantic_aggregate, stem_word)
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
from posttrain.core.sampling.scripted import ScriptedSampler


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, tags", [
    ('[{"tag": "poem writing", "explanation": "asks for a poem"}]', ["poem writing"]),
    ('Sure! Here are the tags:\n```json\n[{"tag": "math", "explanation": "x"},\n {"tag": "algebra", "explanation": "y"}]\n```\nHope it helps.',
     ["math", "algebra"]),
    ("[{'tag': 'python coding', 'explanation': 'the user's code'}, {'tag': 'debugging', 'explanation': 'fix'}]",
     ["python coding", "debugging"]),
    ('[{"tag": "translation", "explanation": "a, b",},] and then some trailing words [1, 2]', ["translation"]),
    ('{"tags": [{"tag": "summarization", "explanation": "s"}]}', ["summarization"]),
    ('["Poem Writing", "poem writing", "humor"]', ["Poem Writing", "humor"]),  # case-insensitive dedupe
    ('```\n[{"tag": "a [bracketed] tag", "explanation": "brackets ] inside strings"}]\n```', ["a [bracketed] tag"]),
    ('noise [not json at all] then [{"tag": "second try", "explanation": ""}]', ["second try"]),
    ('```json\n[{"tag": "unclosed fence", "explanation": "no closing fence"}]', ["unclosed fence"]),
])
def test_parse_tags_accepts_messy_outputs(text, tags):
    assert [t["tag"] for t in parse_tags(text)] == tags


@pytest.mark.parametrize("text", ["", "no json here", "[]", "[1, 2, 3]", '{"tag": ""}', '[{"tag": "' + "x" * 100 + '"}]',
                                  '[{"tag": "unterminated', "{'a': 1}"])
def test_parse_tags_rejects_unusable(text):
    assert parse_tags(text) is None


def test_stemmer_and_rule_key():
    # Snowball English (Porter2) from the snowballstemmer package
    assert stem_word("coding") == stem_word("code") == stem_word("codes") == "code"
    assert stem_word("writing") == stem_word("write") == "write"
    assert stem_word("stories") == stem_word("story")
    assert stem_word("translation") == stem_word("translating") == stem_word("translate")
    assert stem_word("programming") == stem_word("programs") == "program"
    assert stem_word("generously") == "generous" and stem_word("class") == "class"
    assert stem_word("mathematics") != stem_word("math")  # different words stay apart: the semantic step's job
    assert rule_key("Python-Coding!") == rule_key("python   codes") == "python code"
    assert rule_key("Poem_Writing", stem=False) == "poem writing"


def test_auto_min_frequency_scales_instags_threshold():
    assert auto_min_frequency(400_000) == 20 and auto_min_frequency(40) == 1 and auto_min_frequency(20_000) == 1
    assert auto_min_frequency(20_001) == 2 and auto_min_frequency(1_000_000) == 50


# ---------------------------------------------------------------- normalisation on a hand-made list

HAND = [
    ["Coding", "Python programming", "math"],
    ["coding!", "python programming", "mathematics"],
    ["code", "creative writing", "poem writing"],
    ["creative writing", "poem writing"],
    ["Creative-Writing", "poems writing", "humor"],
    ["travel planning", "Math"],
]

# toy embeddings: "mathematics" is near "math", everything else orthogonal
VEC = {"math": [1, 0, 0, 0], "mathematics": [0.95, 0.31, 0, 0], "coding": [0, 1, 0, 0], "python programming": [0, 0.6, 0.8, 0],
       "creative writing": [0, 0, 0, 1], "poem writing": [0, 0, 0.6, 0.8], "humor": [0.2, 0.2, 0.2, 0.2],
       "travel planning": [0.5, -0.5, 0.5, -0.5]}


def toy_embed(tags):
    return np.array([VEC[t] for t in tags], dtype=float)


def test_rule_aggregation_merges_case_punctuation_and_stems():
    m = rule_aggregate({"Coding": 1, "coding!": 1, "code": 1, "Python programming": 2, "poems writing": 1,
                        "poem writing": 2})
    assert m["Coding"] == m["coding!"] == m["code"] == "coding"  # "coding" surface form seen twice, "code" once
    assert m["Python programming"] == "python programming"
    assert m["poems writing"] == "poem writing"


def test_semantic_aggregation_maps_clusters_to_most_frequent():
    m = semantic_aggregate({"math": 3, "mathematics": 1, "coding": 3, "humor": 1}, toy_embed, 0.9)
    assert m == {"math": "math", "mathematics": "math", "coding": "coding", "humor": "humor"}
    # the most frequent member leads, whichever comes first alphabetically
    m = semantic_aggregate({"math": 1, "mathematics": 5}, toy_embed, 0.9)
    assert m["math"] == "mathematics"


def test_association_aggregation_merges_tags_that_always_cooccur():
    lists = [["a", "b", "c"], ["a", "b"], ["a", "b", "d"], ["c", "d"], ["c"]]
    m = association_aggregate(lists, min_count=2, threshold=0.95)
    assert m["a"] == m["b"]  # a and b always together
    assert m["c"] == "c" and m["d"] == "d"
    # below min_count nothing merges
    assert len(set(association_aggregate(lists, min_count=4, threshold=0.95).values())) == 4


def test_normalize_hand_made_list_with_known_merges():
    res = normalize_tags(HAND, ["rule", "semantic", "association", "frequency"], embed=toy_embed,
                         semantic_threshold=0.9, association_min_count=3, association_threshold=0.95, min_frequency=2)
    steps = {r["step"]: r for r in res["report"]}
    assert steps["raw"]["unique_tags"] == 14
    # rule: Coding/coding!/code, Python programming x2, math/Math, creative writing x2, poem(s) writing
    assert steps["rule"]["unique_tags"] == 8
    assert steps["semantic"]["unique_tags"] == 7  # mathematics -> math
    assert steps["association"]["unique_tags"] == 6  # poem writing always with creative writing
    assert steps["frequency"]["unique_tags"] == 4  # humor and travel planning tag one instruction each
    assert res["tags"][0] == ["coding", "python programming", "math"]
    assert res["tags"][1] == ["coding", "python programming", "math"]
    assert res["tags"][4] == ["poem writing"]  # tie at 3 instructions: the shorter name leads
    assert res["tags"][2] == ["coding", "poem writing"]
    assert res["tags"][5] == ["math"]
    assert res["mapping"]["Creative-Writing"] == res["mapping"]["poems writing"] == "poem writing"
    assert res["mapping"]["humor"] is None
    onto = {t["tag"]: t for t in res["ontology"]}
    assert onto["coding"]["count"] == 3 and set(onto["coding"]["variants"]) == {"Coding", "coding!", "code"}
    assert onto["math"]["variants"] == {"Math": 1, "math": 1, "mathematics": 1}


def test_normalize_steps_are_optional_and_semantic_needs_embedder():
    res = normalize_tags(HAND, [])
    assert res["report"] == [{"step": "raw", "unique_tags": 14, "occurrences": 16, "changed": 0}]
    with pytest.raises(ValueError, match="embedding"):
        normalize_tags(HAND, ["semantic"])
    assert normalize_tags([[], []], ["semantic"])["tags"] == [[], []]  # nothing to embed: no model needed


def test_semantic_aggregation_index_matches_exact_on_clustered_vectors():
    """Above exact_max the inverted-file index is used; on well-separated clusters it finds every leader."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    vec = {f"t{i}": centers[i % 40] + rng.normal(scale=0.02, size=32) for i in range(2000)}
    counts = {t: 1 + i % 7 for i, t in enumerate(vec)}
    emb = lambda ts: np.array([vec[t] for t in ts])  # noqa: E731
    exact = semantic_aggregate(counts, emb, 0.9)
    indexed = semantic_aggregate(counts, emb, 0.9, exact_max=0, cell_size=50, probe=4)
    assert indexed == exact and len(set(exact.values())) == 40
    # block size does not change the result (leaders of the same block are compared one by one)
    assert semantic_aggregate(counts, emb, 0.9, block=7) == exact


def test_semantic_aggregation_with_bundled_minilm():
    embed = tag_norm.load_embedder()
    m = semantic_aggregate({"math": 4, "mathematics": 2, "cooking": 3, "python programming": 2}, embed, 0.85)
    assert m["mathematics"] == "math"
    assert m["cooking"] == "cooking" and m["python programming"] == "python programming"


# ---------------------------------------------------------------- the stage with a scripted sampler

INSTRUCTIONS = ["Write a poem about the sea.", "Fix my Python code.", "What is 2 + 2?", "Plan a trip to Rome.",
                "Tell me a joke.", "Translate hello into German."]


def _write_inputs(path, texts=INSTRUCTIONS):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"i{i}", "prompt": [{"role": "user", "content": t}]}) + "\n")


def scripted_tagger(prompt, j):
    """Known outputs: well-formed, fenced, Python-literal, malformed-then-fixed on retry, always malformed."""
    retry = "previous answer" in prompt[-1]["content"]
    text = prompt[-1]["content"].split("<<<")[1].split(">>>")[0]  # the instruction only
    if "poem" in text:
        return '[{"tag": "Poem Writing", "explanation": "a poem"}, {"tag": "creative writing", "explanation": "c"}]'
    if "Python" in text:
        return "```json\n[{'tag': 'code debugging', 'explanation': 'fix'}, {'tag': 'python', 'explanation': 'lang'}]\n```"
    if "2 + 2" in text:
        return '[{"tag": "arithmetic", "explanation": "sum"}]' if retry else "arithmetic, obviously"
    if "joke" in text:
        return "I cannot produce JSON today."
    if "Rome" in text:
        return 'Tags: [{"tag": "travel planning", "explanation": "trip"}, {"tag": "poems writing", "explanation": "?"}] done'
    return '[{"tag": "translation", "explanation": "to German"}]'


def _recipe(tmp_path, **stage):
    _write_inputs(tmp_path / "ins.jsonl")
    data = {"output_dir": str(tmp_path / "run"), "seed": 0,
            "stages": [{"kind": "instag", "input": str(tmp_path / "ins.jsonl"), "max_retries": 1,
                        "steps": ["rule", "frequency"], **stage}]}
    return recipe_from_dict(data, tmp_path / "r.yaml")


def test_instag_stage_tags_retries_and_counts_failures(tmp_path):
    s = ScriptedSampler(scripted_tagger)
    m = _recipe(tmp_path).run(sampler=s)["instag"]["summary"]
    assert len(s.calls) == 2 and len(s.calls[0]) == 6  # all prompts at once, then one retry round
    assert len(s.calls[1]) == 2  # the arithmetic one and the joke
    assert m["instructions"] == 6 and m["tagged"] == 5 and m["failed"] == 1 and m["retried"] == 2
    out = tmp_path / "run" / "instag"
    recs = {r["id"]: r for r in read_records(out / "records.jsonl")}
    assert recs["i0"]["meta"]["tags"] == ["poem writing", "creative writing"]
    assert recs["i3"]["meta"]["tags"] == ["travel planning", "poem writing"]  # "poems writing" merged by rule
    assert recs["i2"]["meta"]["tags"] == ["arithmetic"] and recs["i2"]["meta"]["instag"]["attempts"] == 2
    assert recs["i4"]["meta"]["tags"] == [] and recs["i4"]["meta"]["instag"]["failed"]
    assert recs["i4"]["meta"]["instag"]["last_output"] == "I cannot produce JSON today."
    onto = json.loads((out / "ontology.json").read_text())
    assert {t["tag"]: t["count"] for t in onto["tags"]}["poem writing"] == 2
    assert onto["mapping"]["Poem Writing"] == "poem writing"
    assert [s["step"] for s in onto["steps"]] == ["raw", "rule", "frequency"]


def _cached(path):
    return [json.loads(x)["k"] for x in path.read_text().splitlines() if x.strip()]


def test_instag_kill_and_resume(tmp_path):
    calls = {"n": 0}

    class Killed(RuntimeError):
        pass

    class Dying(ScriptedSampler):
        def generate(self, prompts, params, seeds=None):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Killed("killed mid-run")
            return super().generate(prompts, params, seeds)

    recipe = _recipe(tmp_path, chunk_size=2, max_retries=0)
    with pytest.raises(Killed):
        recipe.run(sampler=Dying(scripted_tagger))
    cache = tmp_path / "run" / "instag" / "steps" / "tag.jsonl"
    assert _cached(cache) == ["i0", "i1"]  # the first chunk was committed, the second lost
    assert not (tmp_path / "run" / "instag" / "records.jsonl").exists()
    assert not (tmp_path / "run" / "instag" / "manifest.json").exists()
    with open(cache, "a") as f:  # a kill during a write leaves a torn line
        f.write('{"k": "i2", "v": [{"te')
    s = ScriptedSampler(scripted_tagger)
    m = recipe.run(sampler=s)["instag"]["summary"]
    sent = [p[-1]["content"] for call in s.calls for p in call]
    assert len(sent) == 4 and not any("poem about" in t or "Python code" in t for t in sent)
    assert [len(c) for c in s.calls] == [2, 2]  # chunk by chunk
    assert sorted(_cached(cache)) == [f"i{i}" for i in range(6)]  # nothing lost, nothing twice
    assert m["instructions"] == 6 and m["tagged"] == 4
    # finished: a re-run skips the stage without sampling
    s2 = ScriptedSampler(scripted_tagger)
    recipe.run(sampler=s2)
    assert s2.calls == []


def test_instag_refuses_to_write_when_no_instruction_gets_tags(tmp_path):
    from data_synthesis.common import LowSuccessRate

    recipe = _recipe(tmp_path, max_retries=1)
    with pytest.raises(LowSuccessRate, match=r"only 0 of 6 instructions tagged .* min_success_rate=0.05"):
        recipe.run(sampler=ScriptedSampler(lambda p, j: "no JSON here"))
    out = tmp_path / "run" / "instag"
    assert not (out / "records.jsonl").exists() and not (out / "manifest.json").exists()
    # the floor is configurable: 0 accepts the empty result
    m = _recipe(tmp_path, max_retries=0, min_success_rate=0.0).run(sampler=ScriptedSampler(lambda p, j: "x"))
    assert m["instag"]["summary"]["tagged"] == 0


def test_instag_config_rejects_unknown_step(tmp_path):
    from posttrain.core.config import ConfigError

    with pytest.raises(ConfigError, match="unknown step 'stemming'"):
        _recipe(tmp_path, steps=["stemming"])


def test_instag_survives_sigkill(tmp_path):
    """A real SIGKILL between two sampler calls: the re-run tags only what is missing."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    _write_inputs(tmp_path / "ins.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "stages": [
        {"kind": "instag", "input": str(tmp_path / "ins.jsonl"), "chunk_size": 2, "max_retries": 0,
         "steps": ["rule"]}]}))
    code = f"""
import sys, time
sys.path.insert(0, {str(repo)!r})
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.sampling.scripted import ScriptedSampler
from tests.test_instag import scripted_tagger

class Hangs(ScriptedSampler):
    def generate(self, prompts, params, seeds=None):
        if self.calls:  # the second chunk never returns: the process is killed here
            time.sleep(120)
        return super().generate(prompts, params, seeds)

load_recipe({str(recipe)!r}).run(sampler=Hangs(scripted_tagger))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raw = tmp_path / "run" / "instag" / "steps" / "tag.jsonl"
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (raw.exists() and raw.read_text().count("\n") >= 2):
            time.sleep(0.2)
        assert raw.exists() and raw.read_text().count("\n") == 2, "the first chunk was never written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    s = ScriptedSampler(scripted_tagger)
    m = load_recipe(recipe).run(sampler=s)["instag"]["summary"]
    assert sum(len(c) for c in s.calls) == 4 and m["instructions"] == 6
    assert sorted(_cached(raw)) == [f"i{i}" for i in range(6)]
