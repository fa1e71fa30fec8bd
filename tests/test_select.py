"""Stage select: complexity-first diverse sampling on a hand-made set, heuristic and LLM scores, report."""

from __future__ import annotations

import json

import pytest

from data_synthesis.selection import (complexity_first_diverse, completeness_checks, completeness_score, parse_judgement,
                                   richness_score)
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
from posttrain.core.sampling.scripted import ScriptedSampler

# index: tags
HAND = [
    ["a", "b", "c"],       # 0: most complex, taken first
    ["a", "b"],            # 1: adds nothing after 0 in pass 1
    ["d"],                 # 2: adds d
    ["a", "d", "e"],       # 3: 3 tags, adds d, e
    [],                    # 4: no tags
    ["c", "f"],            # 5: adds f
    ["b"],                 # 6
]


def test_complexity_first_diverse_covers_tags_first():
    got = complexity_first_diverse(HAND, budget=4, seed=0)
    idx = [i for i, _ in got]
    # 0 and 3 (3 tags) first, in seeded tie order; then 5 adds f; 2 (d) and 1 add nothing new
    assert set(idx[:2]) == {0, 3} and idx[2] == 5
    covered = {t for i in idx[:3] for t in HAND[i]}
    assert covered == {"a", "b", "c", "d", "e", "f"}  # full coverage with 3 instructions
    assert got[3][1] == 1  # the 4th comes from a second pass (coverage reset)
    assert idx[3] == 1  # the most complex remaining one


def test_complexity_first_diverse_fills_budget_and_is_deterministic():
    full = complexity_first_diverse(HAND, budget=10, seed=3)
    assert sorted(i for i, _ in full) == list(range(7))  # everything, tag-less last
    assert full[-1][0] == 4
    assert complexity_first_diverse(HAND, 5, seed=3) == complexity_first_diverse(HAND, 5, seed=3)
    # ties broken by seed: the two 3-tag items swap for some seed
    firsts = {complexity_first_diverse(HAND, 1, seed=s)[0][0] for s in range(20)}
    assert firsts == {0, 3}
    # scores break ties before the seed does
    assert complexity_first_diverse(HAND, 1, scores=[0, 0, 0, 1, 0, 0, 0], seed=0)[0][0] == 3
    assert complexity_first_diverse(HAND, 1, scores=[1, 0, 0, 0, 0, 0, 0], seed=0)[0][0] == 0


def test_without_reset_fills_in_sort_order():
    got = complexity_first_diverse(HAND, budget=5, seed=0, reset_coverage=False)
    assert len(got) == 5 and {i for i, _ in got[:3]} == {0, 3, 5}


def test_heuristic_scores():
    assert richness_score("Hi") < richness_score("Write a sonnet about quantum entanglement, tides and grief")
    assert 0 <= richness_score("") < 0.01 and richness_score(" ".join(f"w{i}x" for i in range(200))) <= 1
    assert completeness_score("Explain how vaccines train the immune system.") == 1.0
    c = completeness_checks("Write a poem about the")
    assert not c["finished"] and c["task_signal"]
    assert not completeness_checks("Summarize [insert article here].")["no_placeholder"]
    assert not completeness_checks("banana")["long_enough"]
    assert completeness_checks("请解释一下量子纠缠是什么？")["task_signal"]


def test_parse_judgement():
    assert parse_judgement('{"semantic_richness": 5, "intent_completeness": 1}') == (1.0, 0.0)
    assert parse_judgement("Scores: ```json\n{'richness': 3, 'completeness': 4}\n```") == (0.5, 0.75)
    assert parse_judgement('{"semantic_richness": 9, "intent_completeness": 1}') is None
    assert parse_judgement("no idea") is None


def _tagged(tmp_path):
    p = tmp_path / "tagged.jsonl"
    with open(p, "w") as f:
        for i, tags in enumerate(HAND):
            text = "Write a detailed plan for topic %d with steps." % i if i != 6 else "Summarize the"
            f.write(json.dumps({"id": f"t{i}", "prompt": [{"role": "user", "content": text}], "meta": {"tags": tags}}) + "\n")
    return p


def _run(tmp_path, sampler=None, **stage):
    data = {"output_dir": str(tmp_path / "run"), "seed": 1,
            "stages": [{"kind": "select", "input": str(_tagged(tmp_path)), **stage}]}
    return recipe_from_dict(data, tmp_path / "r.yaml").run(sampler=sampler)["select"]["summary"]


def test_select_stage_report_and_records(tmp_path):
    rep = _run(tmp_path, budget=3)
    assert rep["before"]["instructions"] == 7 and rep["before"]["distinct_tags"] == 6
    assert rep["after"]["instructions"] == 3 and rep["after"]["tag_coverage"] == 1.0
    assert rep["after"]["mean_tags"] > rep["before"]["mean_tags"]
    recs = read_records(tmp_path / "run" / "select" / "records.jsonl")
    assert [r["meta"]["select"]["rank"] for r in recs] == [0, 1, 2]
    assert {r["id"] for r in recs} == {"t0", "t3", "t5"}
    assert json.loads((tmp_path / "run" / "select" / "report.json").read_text())["after"] == rep["after"]


def test_select_min_completeness_drops_cut_off_instructions(tmp_path):
    rep = _run(tmp_path, budget=10, min_completeness=0.9)
    assert rep["dropped_incomplete"] == 1 and rep["after"]["instructions"] == 6


def test_select_llm_scoring_with_fallback(tmp_path):
    def judge(prompt, j):
        text = prompt[-1]["content"]
        if "topic 1 " in text:
            return "I like it."  # unparseable: heuristic fallback, counted
        return '{"semantic_richness": 4, "intent_completeness": 5}'

    s = ScriptedSampler(judge)
    rep = _run(tmp_path, sampler=s, budget=2, scoring="llm")
    assert len(s.calls) == 1 and len(s.calls[0]) == 7  # all instructions judged in one call
    assert rep["judge_failed"] == 1
    # the judgements are cached per instruction in the judge step: one of the 7 is unparseable
    cached = [json.loads(x) for x in (tmp_path / "run" / "select" / "steps" / "judge.jsonl").read_text().splitlines()]
    assert sorted(r["k"] for r in cached) == [f"t{i}" for i in range(7)]
    assert [r["k"] for r in cached if parse_judgement(r["v"][0]["text"]) is None] == ["t1"]
    recs = read_records(tmp_path / "run" / "select" / "records.jsonl")
    assert all(r["meta"]["select"]["richness"] == 0.75 for r in recs)  # (4 - 1) / 4


def test_select_rejects_bad_budget(tmp_path):
    from posttrain.core.config import ConfigError

    with pytest.raises(ConfigError, match="budget"):
        _run(tmp_path, budget=0)
