"""Code execution feedback: parsing, test cross-checking, the stage with a scripted sampler whose
solutions are right, wrong, malformed and malicious, kill-and-resume, and one real tiny-model run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_synthesis import code_feedback as cf
from reward import code_tests as ct
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
from posttrain.core.sampling.scripted import ScriptedSampler

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "recipes/data/code_problems.jsonl"


# ---------------------------------------------------------------- pure parts

def test_extract_code_and_tests():
    assert ct.extract_code("Sure:\n```python\ndef f(x):\n    return x\n```\nDone") == "def f(x):\n    return x\n"
    assert ct.extract_code("```\nx = 1\n```\nthen\n```py\ny = 2\n```") == "y = 2\n"
    assert ct.extract_code("def g():\n    pass") == "def g():\n    pass\n"
    assert ct.extract_code("I cannot write code today.") is None
    t = ct.extract_tests("```python\nassert f(1) == 2\nassert f(1) == 2\nassert f(2 ==\nprint(3)\n  assert f(0) == 0\n```")
    assert t == ["assert f(1) == 2", "assert f(0) == 0"]
    assert ct.normalize_tests([{"input": [1, 2], "output": 3}, "assert g(1)"], "g", "x") == [
        "assert g(*[1, 2]) == 3", "assert g(1)"]
    with pytest.raises(ValueError, match="x: tests\\[0\\]"):
        ct.normalize_tests([{"input": 1, "output": 2}], None, "x")
    assert cf.normalize_code("def f():  # hi\n\n    return  1\n") == cf.normalize_code("def f():\n    return 1")


def test_select_tests_consensus():
    # 3 solutions agree (pass t0 t1 t2), one disagrees (passes t0 t1 t3); t4 passes nowhere
    m = [[True, True, True, False, False]] * 3 + [[True, True, False, True, False]]
    kept, why = ct.select_tests(m, [False] * 5)
    assert kept == [0, 1, 2] and why == {"no_solution_passes": [4], "against_consensus": [3]}
    kept, _ = ct.select_tests(m, [False, False, False, True, True])  # given tests are trusted
    assert kept == [0, 1, 2, 3, 4]
    assert ct.select_tests([], [True, False]) == ([0], {"no_solution_passes": [], "against_consensus": []})


# ---------------------------------------------------------------- the stage, scripted

RIGHT = {
    "add": "def add(a, b):\n    return a + b\n",
    "reverse_string": "def reverse_string(s):\n    return s[::-1]\n",
    "fizzbuzz": "def fizzbuzz(n):\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
                "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n",
    "max_of_list": "def max_of_list(xs):\n    return max(xs)\n",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)\n",
    "is_prime": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
    "factorial": "import math\n\ndef factorial(n):\n    return math.factorial(n)\n",
}
RIGHT2 = {
    "add": "def add(a, b):\n    return sum([a, b])\n",
    "reverse_string": "def reverse_string(s):\n    return ''.join(reversed(s))\n",
    "fizzbuzz": "def fizzbuzz(n):\n    out = ('Fizz' if n % 3 == 0 else '') + ('Buzz' if n % 5 == 0 else '')\n    return out or str(n)\n",
    "max_of_list": "def max_of_list(xs):\n    best = xs[0]\n    for x in xs:\n        best = x if x > best else best\n    return best\n",
    "count_vowels": "def count_vowels(s):\n    return len([c for c in s.lower() if c in 'aeiou'])\n",
    "is_prime": "def is_prime(n):\n    if n < 2:\n        return False\n    return not any(n % d == 0 for d in range(2, n))\n",
    "factorial": "def factorial(n):\n    r = 1\n    for i in range(2, n + 1):\n        r *= i\n    return r\n",
}
WRONG = {
    "add": "def add(a, b):\n    return a - b\n",
    "reverse_string": "def reverse_string(s):\n    return s\n",
    "fizzbuzz": "def fizzbuzz(n):\n    return 'Fizz' if n % 3 == 0 else str(n)\n",
    "max_of_list": "def max_of_list(xs):\n    return xs[0]\n",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n",
    "is_prime": "def is_prime(n):\n    return n > 1\n",
    "factorial": "def factorial(n):\n    return n * (n - 1)\n",
}
MALICIOUS = [
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",  # fork bomb
    "hog = bytearray(8 * 1024 ** 3)\n",  # memory bomb
    "import os, shutil\nshutil.rmtree(os.path.expanduser('~'), ignore_errors=True)\n"
    "os.remove('/work/main/pyproject.toml')\n",  # deleting the caller's files
    "import sys\nsys.exit(0)\n",  # leaves before the tests run
    "def _cf_run(t):\n    return True\n",  # tries to fake the test runner
    "def {ep}(*a):\n    while True:\n        pass\n",  # hangs in every test
    "def {ep}(*a):\n    import socket\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n",  # network
]
TESTS = {
    "is_prime": ["```python\nassert is_prime(2) == True\nassert is_prime(7)\nassert not is_prime(9)\n"
                 "assert is_prime(4) == True\nassert is_prime(1) == 'x'\n```",
                 "assert is_prime(7)\nassert open('/work/main/pyproject.toml').read()\n"],
    "factorial": ["```python\nassert factorial(0) == 1\nassert factorial(5) == 120\nassert factorial(3) == 6\n"
                  "assert factorial(4) == 25\n```", "no tests here, sorry"],
}
EPS = list(RIGHT)


def fence(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\n"


def scripted(prompt, j):
    text = prompt[-1]["content"]
    ep = next(e for e in EPS if f"`{e}" in text)
    if text.startswith("Write 5 test cases"):
        return TESTS[ep][j % 2]
    return [
        fence(RIGHT[ep]),
        fence(RIGHT2[ep]),
        fence(WRONG[ep]),
        "I think you should use a loop.",  # malformed: no code
        fence(MALICIOUS[EPS.index(ep) % len(MALICIOUS)].replace("{ep}", ep)),
        fence("# the same as the first, with comments\n" + RIGHT[ep].replace("\n", "  # ok\n", 1)),
    ][j]


def recipe(tmp_path, **stage):
    # Limits well above what a right solution needs even on a loaded machine (at 0.5 s per test a
    # fresh-clone run under load timed one right solution out: 13 demonstrations instead of 14), and a
    # whole-run limit above every test hanging to its own limit (6 x 2 s), so a hanging solution ends as
    # failed tests and only the fork bomb runs out the clock.
    st = {"kind": "code_feedback", "name": "cf", "input": str(CODE), "n_solutions": 6, "chunk_size": 3,
          "timeout_s": 30.0, "test_timeout_s": 2.0, "memory_mb": 256, "workers": 2, **stage}
    data = {"output_dir": str(tmp_path / "out"), "model": {"path": "unused"}, "stages": [st]}
    return recipe_from_dict(data, tmp_path / "r.yaml", check_models=False)  # the sampler is injected


def _isolated() -> bool:
    from reward.sandbox import isolation_info

    return isolation_info()["mode"] in ("namespaces", "userns")


# The scripted solutions include destructive code: it may only run where the sandbox isolates it.
needs_isolation = pytest.mark.skipif(not _isolated(), reason="the sandbox has no namespaces on this machine")


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cf")
    res = recipe(tmp).run(sampler=ScriptedSampler(scripted))
    return tmp / "out/cf", res["cf"]["summary"]


@needs_isolation
def test_stage_results(scripted_run):
    out, s = scripted_run
    assert Path("/work/main/pyproject.toml").exists()  # the malicious solution deleted nothing
    assert s["problems"] == 7 and s["problems_with_passing"] == 7
    rows = {r["id"]: r["meta"] for r in read_records(out / "problems.jsonl")}
    for pid, m in rows.items():
        assert m["status"][0] == m["status"][1] == m["status"][5] == "pass", (pid, m)
        assert m["status"][2] == "fail" and m["status"][3] == "malformed" and m["status"][4] != "pass", (pid, m)
        assert m["passing"] == 3 and m["kept"] == 2  # the commented copy is a duplicate of the first
        assert m["pass_counts"][0] == m["tests_kept"] > m["pass_counts"][2]
    # model-written tests were cross-checked: wrong / impossible / malicious ones dropped
    p = rows["code-prime"]
    assert p["tests_given"] == 0 and p["tests_candidate"] == 6
    assert p["kept_tests"] == ["assert is_prime(2) == True", "assert is_prime(7)", "assert not is_prime(9)"]
    assert p["tests_against_consensus"] == 1 and p["tests_no_solution_passes"] == 2
    f = rows["code-factorial"]
    assert f["tests_kept"] == 3 and f["tests_no_solution_passes"] == 1
    assert rows["code-fizzbuzz"]["kept_tests"][0] == "assert fizzbuzz(*[3]) == 'Fizz'"
    # statuses of the sandbox show up for malicious solutions
    # (the fork bomb runs out the clock; the others are caught inside: memory, deletion, exit, fake runner,
    # endless tests, network all end as failed tests)
    assert rows["code-add"]["status"][4] == "timeout"
    assert all(m["status"][4] == "fail" for pid, m in rows.items() if pid != "code-add")


@needs_isolation
def test_stage_records(scripted_run):
    out, s = scripted_run
    demos = read_records(out / "demonstrations.jsonl")
    prefs = read_records(out / "preferences.jsonl")
    assert len(demos) == s["demonstrations"] == 14 and len(prefs) == s["preferences"] == 21
    for d in demos:
        assert d["meta"]["status"] == "pass" and d["meta"]["passed"] == d["meta"]["total"] > 0
        assert "```python" in d["messages"][-1]["content"]
    for p in prefs:
        assert p["meta"]["chosen_passed"] == p["meta"]["total"] > p["meta"]["rejected_passed"]
        assert 0 < p["margin"] <= 1
    assert len({d["id"] for d in demos}) == len(demos) and len({p["id"] for p in prefs}) == len(prefs)
    rep = json.loads((out / "report.json").read_text())
    assert rep["problems"] == 7 and rep["malformed_rate"] == pytest.approx(1 / 6, abs=1e-3)


class Crash(RuntimeError):
    pass


def _cache(path: Path) -> list[str]:
    """The keys of a step cache, in file order (repeats kept, so a duplicate shows)."""
    return [json.loads(line)["k"] for line in path.read_text().splitlines() if line.strip()]


@needs_isolation
def test_kill_and_resume(tmp_path, scripted_run):
    full_out, full = scripted_run
    calls = {"n": 0}

    class Dying(ScriptedSampler):
        def generate(self, prompts, params, seeds=None):
            calls["n"] += 1
            if calls["n"] == 2:  # chunk 1: solutions of 3 problems; chunk 2: dies at its solutions
                raise Crash("killed")
            return super().generate(prompts, params, seeds)

    with pytest.raises(Crash):
        recipe(tmp_path).run(sampler=Dying(scripted))
    out = tmp_path / "out/cf"
    # the first chunk is committed, nothing else; no records are written before the end
    assert _cache(out / "steps/solutions.jsonl") == ["code-add", "code-reverse", "code-fizzbuzz"]
    assert not (out / "steps/tests.jsonl").exists() and not (out / "steps/runs.jsonl").exists()
    for name in ("demonstrations.jsonl", "preferences.jsonl", "problems.jsonl"):
        assert not (out / name).exists()
    with open(out / "steps/solutions.jsonl", "a") as f:  # a kill mid-write: the torn line is cut on resume
        f.write('{"k": "code-max", "v": [')
    again = ScriptedSampler(scripted)
    s = recipe(tmp_path).run(sampler=again)["cf"]["summary"]
    # only the 4 missing problems' solutions are sampled again (plus the 2 test-writing prompts)
    assert sum(len(c) for c in again.calls if "Write 5 test" not in c[0][-1]["content"]) == 4
    for k in ("problems", "demonstrations", "preferences", "tests_kept", "problems_with_passing"):
        assert s[k] == full[k], k
    for step in ("solutions", "runs"):  # every problem once: nothing lost, no duplicates
        assert sorted(_cache(out / f"steps/{step}.jsonl")) == sorted(_cache(full_out / f"steps/{step}.jsonl"))
    assert sorted(_cache(out / "steps/tests.jsonl")) == ["code-factorial", "code-prime"]
    for name in ("demonstrations.jsonl", "preferences.jsonl", "problems.jsonl"):
        got = read_records(out / name)
        assert len({r["id"] for r in got}) == len(got)
        assert sorted(got, key=lambda r: r["id"]) == sorted(read_records(full_out / name), key=lambda r: r["id"])


@needs_isolation
def test_real_run_on_tiny_model(tmp_path, vllm_sampler):
    # the random tiny model writes no code: min_success_rate 0 lets the run go end to end
    res = recipe(tmp_path, limit=3, n_solutions=2, n_test_samples=1, chunk_size=2, min_success_rate=0,
                 sampling={"max_tokens": 32, "temperature": 1.0, "seed": 0}).run(sampler=vllm_sampler)
    s = res["cf"]["summary"]
    assert s["problems"] == 3
    rows = [r["meta"] for r in read_records(tmp_path / "out/cf/problems.jsonl")]
    assert all(len(m["status"]) == 2 for m in rows)
