"""Rejection sampling: answer extraction / equivalence, path dedupe, the stage with a scripted
sampler (right, duplicate, wrong, malformed, malicious outputs), kill-and-resume, best-of-N,
and one real run on the tiny model through vLLM."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from data_synthesis import paths
from reward import answers as mv
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
from posttrain.core.sampling.scripted import ScriptedSampler

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "recipes/data/math_problems.jsonl"


# ---------------------------------------------------------------- extraction and equivalence

@pytest.mark.parametrize("text,order,expect", [
    ("so 3+4=7. \\boxed{7} and later 9", mv.DEFAULT_ORDER, "7"),
    ("nested \\boxed{\\frac{1}{2}} end", mv.DEFAULT_ORDER, "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", mv.DEFAULT_ORDER, "2"),
    ("unbalanced \\boxed{12 oops", mv.DEFAULT_ORDER, "12"),  # falls through to the last number
    ("Natalia sold 48/2 = 24 clips.\n#### 72", mv.DEFAULT_ORDER, "72"),
    ("We get 5 + 7 = 12. The answer is 12.", mv.DEFAULT_ORDER, "12"),
    ("The final answer is: 3.5 dollars.", mv.DEFAULT_ORDER, "3.5 dollars"),
    ("I think it is 1,234 or so", mv.DEFAULT_ORDER, "1,234"),
    ("no digits at all", mv.DEFAULT_ORDER, None),
    ("The answer is 5. #### 6", ("answer_is", "hash"), "5"),
    ("The answer is 5. #### 6", ("hash", "answer_is"), "6"),
    ("only 42 here", ("boxed", "hash"), None),
])
def test_extract_answer(text, order, expect):
    assert mv.extract_answer(text, order) == expect


@pytest.mark.parametrize("pred,ref,expect", [
    ("72", "72", True), ("72.0", "72", True), ("1,234", "1234", True), ("\\frac{3}{4}", "0.75", True),
    ("3/4", "0.75", True), ("50%", "50", True), ("$9", "9", True), ("x = 5", "5", True),
    ("9 dollars", "9", True), ("0.33", "1/3", False), ("0.33333", "1/3", False), ("0.333333", "1/3", True),
    ("\\sqrt{4}", "2", True), ("2\\pi", "\\pi \\cdot 2", True), ("71", "72", False), (None, "72", False),
    ("yes", "Yes.", True), ("blue", "red", False),
])
def test_answers_equal(pred, ref, expect):
    assert mv.answers_equal(pred, ref) is expect


def test_numeric_fallback_without_math_verify():
    assert mv.answers_equal("\\frac{6}{8}", "0.75", use_math_verify=False)
    assert not mv.answers_equal("\\sqrt{4}", "2", use_math_verify=False)  # only symbolic math gets this


def test_is_correct_and_reference_reduction():
    assert mv.reference_answer("Step one.\n#### 1,000") == "1,000"
    assert mv.is_correct("12 * 5 = 60 so \\boxed{60}", "Some solution #### 60")
    assert not mv.is_correct("I don't know", "60")
    assert paths.pass_at_k(4, 1, 1) == 0.25 and paths.pass_at_k(4, 1, 4) == 1.0 and paths.pass_at_k(4, 0, 4) == 0.0


def test_equation_signature_and_diverse_selection():
    a = "First 3 × 4 = 12, then 12 + 5 = 17. So \\boxed{17}"
    b = "first 3*4=12,  then 12+5 = 17 . So \\boxed{17}!"  # same computation, other spacing
    c = "Add five to twelve after multiplying three by four: seventeen, \\boxed{17}"
    d = "4 × 3 = 12 and 5 + 12 = 17 \\boxed{17}"
    assert paths.equation_signature(a) == ("3*4=12", "12+5=17") == paths.equation_signature(b)
    assert paths.similarity(a, b) == 1.0 and paths.similarity(a, c) < 0.9
    picked = paths.select_diverse([a, b, c, d], 2)
    assert picked[0] == 0 and 1 not in picked and len(picked) == 2
    assert paths.select_diverse([a, b, c, d], 10) == [0, 2, 3] or sorted(paths.select_diverse([a, b, c, d], 10)) == [0, 2, 3]


# ---------------------------------------------------------------- the stage with a scripted sampler

def _answers() -> dict[str, str]:
    out = {}
    for line in MATH.read_text().splitlines():
        r = json.loads(line)
        out[r["prompt"][0]["content"]] = r["meta"]["answer"]
    return out


ANS = _answers()


def scripted(prompt, j):
    """Six kinds of path per problem: right, right again (duplicate), right by another route,
    wrong, malformed (no answer) and malicious (code instead of an answer)."""
    q = prompt[-1]["content"].split("\nPlease reason")[0]
    ref = ANS[q]
    return [
        f"Let me compute step by step. 1 + 1 = 2. The result is \\boxed{{{ref}}}",
        f"Let me compute step by step.  1+1 = 2.  The result is \\boxed{{{ref}}}",
        f"Working it out differently in words we find the answer is {ref}.",
        f"Careless: 2 * 2 = 5, so \\boxed{{{float(ref) + 1:g}}}",
        "I am not sure how to solve this one",
        "import os; os.system('rm -rf / --no-preserve-root')",
    ][j % 6]


def recipe(tmp_path, **stage):
    st = {"kind": "rejection_sampling", "name": "rs", "input": str(MATH), "k": 6, "chunk_size": 8,
          "sampling": {"max_tokens": 64}, **stage}
    data = {"output_dir": str(tmp_path / "out"), "model": {"path": "unused"}, "stages": [st]}
    return recipe_from_dict(data, tmp_path / "r.yaml", check_models=False)  # the sampler is injected


def test_stage_keeps_verified_diverse_paths(tmp_path):
    res = recipe(tmp_path, max_per_problem=4).run(sampler=ScriptedSampler(scripted))
    s = res["rs"]["summary"]
    n = 36
    assert s["problems"] == s["with_reference"] == n
    assert s["pass@1"] == pytest.approx(0.5) and s["pass@k"] == 1.0
    assert s["no_answer_rate"] == pytest.approx(2 / 6, abs=1e-3)
    out = tmp_path / "out/rs"
    demos = read_records(out / "demonstrations.jsonl")
    prefs = read_records(out / "preferences.jsonl")
    # 3 correct paths, two of them the same computation: 2 kept per problem
    assert len(demos) == 2 * n
    for d in demos:
        assert "\\boxed{" in d["messages"][0]["content"]  # instruction added to the prompt
        assert d["meta"]["path_index"] in (0, 2)
        assert mv.is_correct(d["messages"][-1]["content"], d["meta"]["reference"])
    # preferences: correct vs incorrect, wrong answers before malformed / malicious ones
    assert len(prefs) == 3 * n
    for p in prefs:
        assert mv.is_correct(p["chosen"][0]["content"], p["meta"]["reference"])
        assert not mv.is_correct(p["rejected"][0]["content"], p["meta"]["reference"])
    assert len({r["id"] for r in demos}) == len(demos) and len({r["id"] for r in prefs}) == len(prefs)
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["per_problem"]) == n and all(r["kept"] == 2 and r["correct"] == 3 for r in rep["per_problem"])


def test_max_per_problem_and_truncated_paths(tmp_path):
    class Truncating(ScriptedSampler):
        def generate(self, prompts, params, seeds=None):
            outs = super().generate(prompts, params, seeds)
            for comps in outs:
                comps[2].finish_reason = "length"  # the route in words was cut off: never "correct"
            return outs

    res = recipe(tmp_path, max_per_problem=1, limit=5).run(sampler=Truncating(scripted))
    s = res["rs"]["summary"]
    assert s["problems"] == 5 and s["demonstrations"] == 5 and s["pass@1"] == pytest.approx(2 / 6, abs=1e-3)


def test_problems_without_reference_are_skipped_or_best_of_n(tmp_path, monkeypatch):
    data = tmp_path / "noref.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell a story {i}"}) + "\n" for i in range(3)))
    res = recipe(tmp_path, input=str(data)).run(sampler=ScriptedSampler(lambda p, j: f"story {j}"))
    assert res["rs"]["summary"]["skipped_no_reference"] == 3 and res["rs"]["summary"]["demonstrations"] == 0

    calls = []

    class FakeScorer:  # stands in for reward.scorer.RewardScorer (same signature)
        def __init__(self, model_path):
            calls.append(model_path)

        def score(self, prompts, responses):
            assert len(prompts) == len(responses)
            return [float(len(r)) for r in responses]

    monkeypatch.setitem(sys.modules, "reward.scorer", types.SimpleNamespace(RewardScorer=FakeScorer))
    sampler = ScriptedSampler(lambda p, j: "x" * (j + 1))
    rm = tmp_path / "rm-path"
    rm.mkdir()
    res = recipe(tmp_path / "b", input=str(data), reward_model=str(rm), k=4).run(sampler=sampler)
    s = res["rs"]["summary"]
    assert calls == [str(rm)] and s["best_of_n"] == 3 and s["demonstrations"] == 3 and s["preferences"] == 3
    prefs = read_records(tmp_path / "b/out/rs/preferences.jsonl")
    assert all(p["chosen"][0]["content"] == "xxxx" and p["rejected"][0]["content"] == "x" for p in prefs)
    assert all(p["margin"] == 3.0 for p in prefs)


class Crash(RuntimeError):
    pass


def test_kill_and_resume(tmp_path):
    full = recipe(tmp_path / "ref").run(sampler=ScriptedSampler(scripted))["rs"]["summary"]

    calls = {"n": 0}

    def dying(prompt, j):
        if j == 0 and prompt is not None:
            calls["n"] += 1
            if calls["n"] > 20:  # dies inside the third chunk (chunk_size 8)
                raise Crash("killed")
        return scripted(prompt, j)

    with pytest.raises(Crash):
        recipe(tmp_path).run(sampler=ScriptedSampler(dying))
    out, ref = tmp_path / "out/rs", tmp_path / "ref/out/rs"
    cache = lambda d: [json.loads(x) for x in (d / "steps/paths.jsonl").read_text().splitlines()]  # noqa: E731
    # the two finished chunks (16 problems) are committed, exactly as the uninterrupted run sampled them;
    # no records are written before the end
    assert cache(out) == cache(ref)[:16]
    for name in ("demonstrations.jsonl", "preferences.jsonl", "problems.jsonl"):
        assert not (out / name).exists()
    with open(out / "steps/paths.jsonl", "a") as f:  # a kill mid-write: the torn line is cut on resume
        f.write('{"k": "math-017", "v": [{"text": "torn')
    again = ScriptedSampler(scripted)
    res = recipe(tmp_path).run(sampler=again)["rs"]["summary"]
    assert sum(len(c) for c in again.calls) == 36 - 16  # committed problems were not sampled again
    for k in ("problems", "demonstrations", "preferences", "pass@1", "pass@k"):
        assert res[k] == full[k], k
    # every problem cached once, as the uninterrupted run has it: nothing lost, no duplicates
    got = cache(out)
    assert len({r["k"] for r in got}) == len(got) == 36
    assert sorted(got, key=lambda r: r["k"]) == sorted(cache(ref), key=lambda r: r["k"])
    for name in ("demonstrations.jsonl", "preferences.jsonl", "problems.jsonl"):
        recs = read_records(out / name)
        assert len({r["id"] for r in recs}) == len(recs)
        assert sorted(recs, key=lambda r: r["id"]) == sorted(read_records(ref / name), key=lambda r: r["id"])


def test_bad_config_is_one_line_error(tmp_path):
    from posttrain.core.config import ConfigError

    with pytest.raises(ConfigError, match="extractors"):
        recipe(tmp_path, extractors=["boxed", "magic"])


# ---------------------------------------------------------------- real model

def test_real_run_on_tiny_model_with_vllm(tmp_path, vllm_sampler):
    res = recipe(tmp_path, k=3, limit=4, sampling={"max_tokens": 24, "temperature": 1.0, "seed": 0},
                 chunk_size=2).run(sampler=vllm_sampler)
    s = res["rs"]["summary"]
    assert s["problems"] == 4 and s["with_reference"] == 4
    assert 0.0 <= s["pass@1"] <= s["pass@k"] <= 1.0
    rep = json.loads((tmp_path / "out/rs/report.json").read_text())
    assert all(r["samples"] == 3 for r in rep["per_problem"])
    # every kept demonstration is a verified path (random weights: usually none)
    for d in read_records(tmp_path / "out/rs/demonstrations.jsonl") if s["demonstrations"] else []:
        assert mv.is_correct(d["messages"][-1]["content"], d["meta"]["reference"])


def test_best_of_n_with_the_real_reward_scorer(tmp_path, tiny_model_dir):
    """Problems without a reference, scored by the tiny (random) reward model through reward.scorer."""
    pytest.importorskip("reward.scorer")
    data = tmp_path / "noref.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Write a haiku about {w}"}) + "\n"
                            for i, w in enumerate(["rain", "snow"])))
    texts = ["Soft rain on the roof", "Snow falls, silent, white", "words", "Cold wind and grey sky"]
    res = recipe(tmp_path, input=str(data), k=4, reward_model=str(tiny_model_dir / "reward"),
                 reward_tokenizer=str(tiny_model_dir)).run(sampler=ScriptedSampler(lambda p, j: texts[j]))
    s = res["rs"]["summary"]
    assert s["best_of_n"] == 2 and s["demonstrations"] == 2
    rep = json.loads((tmp_path / "out/rs/report.json").read_text())
    for row, demo in zip(rep["per_problem"], read_records(tmp_path / "out/rs/demonstrations.jsonl")):
        scores = row["scores"]
        assert len(scores) == 4 and len(set(scores)) > 1  # a real model gives distinct scores
        assert demo["messages"][-1]["content"] == texts[scores.index(max(scores))]
    for p in read_records(tmp_path / "out/rs/preferences.jsonl"):
        assert p["margin"] > 0 and p["meta"]["chosen_reward"] > p["meta"]["rejected_reward"]
