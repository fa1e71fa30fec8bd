"""Pieces of the main job: multi-step task, instruction-following verifiers, intervals, the run's ETA line."""

import random
import re
from pathlib import Path

import pytest

from data_synthesis.make_task import CONSTRAINTS, TaskConfig, if_prompts, make_multistep, make_problem
from posttrain.core.recipe import RunTimings
from posttrain.evaluation.report import ReportConfig, interval_findings
from posttrain.stages import load_recipe
from posttrain.evaluation.stats import bootstrap_ci, excludes_zero, paired_diff_ci
from reward.answers import answer_ok, format_ok, is_correct


def _eval_equations(worked: str) -> int:
    """Check every 'a op b = c.' step of a worked answer and return the last result."""
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", worked)
    assert steps, worked
    prev = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert prev is None or a == prev, worked  # each step starts from the previous result
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, worked
        prev = c
    return prev


@pytest.mark.parametrize("steps,ops", [(2, "+-"), (3, "+-*"), (4, "-")])
def test_multistep_problems_are_worked_correctly(steps, ops):
    rng = random.Random(0)
    for _ in range(300):
        q, worked, ans = make_multistep(rng, 10, ops, steps)
        assert _eval_equations(worked) == ans >= 0
        assert len(re.findall(r"=", worked)) == steps
        assert answer_ok(worked, ans) and format_ok(worked) and is_correct(worked, str(ans))
        assert q.endswith("End your reply with 'The answer is N.'")


def test_one_step_task_is_unchanged():
    # the tiny demo's data (and so its README numbers) depend on this generator staying as it was
    q, a, c = make_problem(random.Random(3), 10, "+-")
    assert (q, a, c) == make_problem(random.Random(3), 10, "+-")
    assert a == f"{a.split(' = ')[0]} = {c}. The answer is {c}."


def test_task_config_refuses_products_in_one_step_problems():
    with pytest.raises(ValueError, match="needs steps >= 2"):
        TaskConfig(ops="+*").check()
    with pytest.raises(ValueError, match="steps must be 1 to 4"):
        TaskConfig(steps=5).check()


def _verdict(src: str, response: str) -> bool:
    ns: dict = {}
    exec(src, ns)  # the sources are our own constants; evaluation runs them in the sandbox
    return bool(ns["evaluate"](response))


# one response that obeys and near misses that must fail, per constraint (in CONSTRAINTS order)
CASES = [
    ("the sea is wide and calm.", ["The sea is wide.", "1234", ""]),
    ("THE SEA IS WIDE.", ["THE SEA Is WIDE.", "42", ""]),
    ("The sea is wide and calm today.", ["one two three four five six seven eight nine ten eleven twelve thirteen",
                                         ""]),
    ("The sea is wide and calm.", ["The sea, wide and calm.", "   "]),
    ("Sure, the sea is wide.", ["sure, the sea is wide.", "I am Sure."]),
    ("The sea is wide. That is all.", ["That is all. The sea is wide.", "The sea is wide. That is all"]),
    ("The sky is Blue today.", ["The sky is azure.", "bl ue"]),
]


@pytest.mark.parametrize("i", range(len(CONSTRAINTS)))
def test_instruction_following_verifiers_reject_near_misses(i):
    _, src = CONSTRAINTS[i]
    good, bad = CASES[i]
    assert _verdict(src, good)
    for b in bad:
        assert not _verdict(src, b), (CONSTRAINTS[i][0], b)


def test_if_prompts_are_distinct_seeded_and_carry_their_verifier():
    a, b = if_prompts(120, 0), if_prompts(120, 0)
    assert a == b and len({r["prompt"][0]["content"] for r in a}) == 120
    assert if_prompts(120, 1) != a
    srcs = dict(CONSTRAINTS)
    for r in a:
        assert r["meta"]["verifiers"] == [srcs[r["meta"]["constraint"]]]
        assert r["meta"]["constraint"] in r["prompt"][0]["content"]
    with pytest.raises(ValueError, match="at most"):
        if_prompts(10_000, 0)


def test_bootstrap_intervals():
    lo, hi = bootstrap_ci([1.0] * 30 + [0.0] * 70)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert bootstrap_ci([1.0, 0.0] * 50) == bootstrap_ci([1.0, 0.0] * 50)  # seeded: a report is reproducible
    # paired: the same items, b right exactly where a is right plus 20 more -> the difference is certain
    a = [1.0] * 20 + [0.0] * 80
    b = [1.0] * 40 + [0.0] * 60
    d, lo, hi = paired_diff_ci(b, a)
    assert d == pytest.approx(0.2) and excludes_zero(lo, hi) and lo > 0.1
    d, lo, hi = paired_diff_ci(a, list(reversed(a)))
    assert d == 0 and not excludes_zero(lo, hi)
    with pytest.raises(ValueError, match="not the same items"):
        paired_diff_ci([1.0], [1.0, 0.0])


def test_report_states_differences_with_intervals_whatever_the_sign():
    base = {"checkpoint": "base", "verdicts": {"accuracy": [0.0] * 90 + [1.0] * 10, "if_pass_rate": [1.0] * 50 + [0.0] * 50}}
    sft = {"checkpoint": "sft", "verdicts": {"accuracy": [0.0] * 60 + [1.0] * 40, "if_pass_rate": [1.0] * 50 + [0.0] * 50}}
    on = {"checkpoint": "on", "verdicts": {"accuracy": [0.0] * 60 + [1.0] * 40, "if_pass_rate": [1.0] * 10 + [0.0] * 90}}
    by = {r["checkpoint"]: r for r in (base, sft, on)}
    lines = interval_findings(by, ReportConfig(eval="x", baseline="base", sft="sft", compare=["on"]))
    text = "\n".join(lines)
    assert "Accuracy vs the base model: `on` - `base` = +0.300" in text and "excludes 0" in text
    assert "Accuracy vs SFT: `on` - `sft` = +0.000" in text and "no difference shown" in text
    assert "alignment tax: `on` - `sft` = -0.400" in text


def test_eta_line_uses_the_previous_runs_timings(tmp_path):
    t = RunTimings(tmp_path / "timings.json")
    assert t.eta(["a", "b"], 5) == "elapsed 5s"
    t.record("a", 100)
    t.record("b", 30.4)
    again = RunTimings(tmp_path / "timings.json")
    assert again.eta(["a", "b"], 65) == "elapsed 1m05s, about 2m10s left (previous run's timings)"
    assert "1 stage(s) never timed" in again.eta(["b", "c"], 0)
    (tmp_path / "timings.json").write_text("{torn")
    assert RunTimings(tmp_path / "timings.json").eta(["a"], 1) == "elapsed 1s"


def test_the_main_job_recipe_validates():
    """recipes/demo/smollm2.yaml (make demo) parses strictly; its model stage is a GGUF import."""
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "demo" / "smollm2.yaml", check_models=False)
    kinds = [s.kind for s in recipe.stages]
    assert kinds[0] == "import_model" and kinds.count("online_dpo") == 2 and kinds[-2:] == ["eval", "report"]


def test_min_steps_mixes_problem_lengths(tmp_path):
    from types import SimpleNamespace

    from data_synthesis.make_task import run

    cfg = TaskConfig(n_sft=0, n_prompts=200, n_eval=10, n_if_eval=5, steps=2, min_steps=1, max_operand=10)
    cfg.check()
    run(cfg, SimpleNamespace(out_dir=tmp_path))
    lines = (tmp_path / "prompts.jsonl").read_text().splitlines()
    counts = [line.count(" more") + line.count("gives away") for line in lines]
    assert {1, 2} <= set(counts) and len(lines) == 200
    assert len((tmp_path / "if_eval.jsonl").read_text().splitlines()) == 5
    with pytest.raises(ValueError, match="min_steps"):
        TaskConfig(steps=1, min_steps=1).check()


def test_a_lone_cpu_engine_is_bound_to_every_core(monkeypatch):
    import os

    from posttrain.core.sampling.vllm_backend import all_cores_when_alone

    key = "VLLM_CPU_OMP_THREADS_BIND"
    monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    with all_cores_when_alone(True):
        assert os.environ[key] == "0,1,2"
    assert key not in os.environ  # restored once the engine has started
    with all_cores_when_alone(False):  # GPU engines are not bound
        assert key not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")  # several ranks: engine_per_rank gives each its share
    with all_cores_when_alone(True):
        assert key not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv(key, "1")  # the user's binding is kept
    with all_cores_when_alone(True):
        assert os.environ[key] == "1"
