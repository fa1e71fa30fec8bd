"""Stage ``if_feedback``: verifier cross-validation on hand-made functions with known outcomes (in the real
sandbox), malicious verifiers contained, pass rates / evaluator, the whole stage with a scripted sampler
(malformed JSON and unparseable verdicts included), back-translation of up to ``back_translate_functions``
functions, the quality filter, up to ``max_pairs_per_prompt`` pairs per prompt, kill-and-resume (a real SIGKILL
mid-step), the success-rate floor, and one real run on the tiny model through vLLM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from data_synthesis import if_feedback
from data_synthesis.if_feedback import load_seeds, parse_consistency, parse_quality_score, parse_verifier_reply
from reward.if_verifiers import (CrossValConfig, cross_validate, evaluate_response, load_verifiers, pass_rates,
                                 uses_network)
from reward.sandbox import SandboxLimits, SandboxPool
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records, record_id
from posttrain.core.sampling.scripted import ScriptedSampler

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "recipes/data/if_seed_constraints.jsonl"


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(limits=SandboxLimits(timeout_s=3.0, memory_mb=256)) as p:
        yield p


def run_recipe(tmp_path: Path, stages: list[dict], sampler, out: str = "out") -> dict:
    """Run stages through Recipe (with an injected sampler); return the manifests."""
    data = {"output_dir": str(tmp_path / out), "seed": 0, "stages": stages}
    return recipe_from_dict(data, tmp_path / "recipe.yaml").run(sampler=sampler)


# ---------------------------------------------------------------- cross-validation, known outcomes

GOOD = "def evaluate(response):\n    return len(response.split()) < 5\n"
GOOD2 = "import re\n\ndef evaluate(response):\n    return len(re.findall(r'\\S+', response)) < 5\n"
OFF_BY_ONE = "def evaluate(response):\n    return len(response.split()) <= 5\n"  # wrong on 5 words
ALWAYS = "def evaluate(response):\n    return True\n"
SYNTAX = "def evaluate(response) return 1\n"
NETWORK = "import socket\n\ndef evaluate(response):\n    return len(response.split()) < 5\n"
NOT_BOOL = "def evaluate(response):\n    return len(response.split())\n"
CASES = [{"input": "a b c", "output": True},               # everyone right
         {"input": "a b c d e", "output": False},          # OFF_BY_ONE, ALWAYS wrong
         {"input": "a b c d e f g", "output": False},      # ALWAYS wrong
         {"input": "one", "output": True},
         {"input": "x y", "output": False}]                # wrong case: no function agrees -> dropped


def test_cross_validate_known_outcomes(pool):
    funcs = [GOOD, GOOD2, OFF_BY_ONE, ALWAYS, SYNTAX, NETWORK, NOT_BOOL, GOOD]  # GOOD twice: deduplicated
    r = cross_validate(funcs, CASES + [CASES[0]], pool, CrossValConfig(min_candidate_functions=3, min_candidate_cases=4))
    assert r.kept and r.reason == "ok"
    assert r.cases == CASES[:4]  # the wrong case is gone, the duplicate case counted once
    assert r.dropped == {"network": 1, "raises": 1}
    usable = [GOOD, GOOD2, OFF_BY_ONE, ALWAYS, SYNTAX, NOT_BOOL]
    assert {usable[int(i)]: a for i, a in r.accuracy.items()} == {GOOD: 1.0, GOOD2: 1.0, OFF_BY_ONE: 0.75, ALWAYS: 0.5, NOT_BOOL: 0.0}
    assert r.functions == [GOOD, GOOD2]
    # the threshold decides: at 0.75 the off-by-one function stays
    r = cross_validate(funcs, CASES, pool, CrossValConfig(function_accuracy=0.75, min_candidate_functions=3, min_candidate_cases=4))
    assert r.functions == [GOOD, GOOD2, OFF_BY_ONE]


@pytest.mark.parametrize("cfg,reason", [
    (CrossValConfig(min_candidate_functions=3, min_candidate_cases=10), "too_few_candidates"),  # AutoIF's 10 cases
    (CrossValConfig(min_candidate_functions=7, min_candidate_cases=1), "too_few_candidates"),  # 6 usable functions
    (CrossValConfig(min_candidate_functions=1, min_candidate_cases=1, min_functions=3), "too_few_functions"),
    (CrossValConfig(min_candidate_functions=1, min_candidate_cases=1, min_cases=5), "too_few_cases"),
])
def test_cross_validate_instruction_thresholds(pool, cfg, reason):
    r = cross_validate([GOOD, GOOD2, OFF_BY_ONE, ALWAYS, SYNTAX, NETWORK, NOT_BOOL], CASES, pool, cfg)
    assert not r.kept and r.reason == reason


def test_shipped_seed_verifiers_all_pass_cross_validation(pool):
    seeds = load_seeds(SEEDS)
    assert len(seeds) >= 12 and len({s["category"] for s in seeds}) >= 5
    for s in seeds:
        r = cross_validate(s["functions"], s["cases"], pool, CrossValConfig(min_candidate_functions=2, min_candidate_cases=6))
        assert r.kept and len(r.functions) == 2 and len(r.cases) == 6, s["id"]
        assert set(r.accuracy.values()) == {1.0}, s["id"]


def test_malicious_verifiers_are_contained(pool, tmp_path):
    host_file = Path("/tmp") / f"iff-pwned-{uuid.uuid4().hex}"
    os.environ["IFF_TEST_SECRET"] = "s3cret"
    hits = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                hits.append(srv.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    correct = "len(response.split()) < 5"
    malicious = {
        "loop": "def evaluate(response):\n    while True:\n        pass\n",
        "memory": "def evaluate(response):\n    x = bytearray(4 * 1024 ** 3)\n    return True\n",
        "exit_at_load": "import os\nos._exit(0)\ndef evaluate(response):\n    return True\n",
        # right answers only if the network (host loopback) is reachable: kept only on an escape
        "hidden_network": ("def evaluate(response):\n    try:\n        s = __import__('soc' + 'ket')\n"
                           f"        s.create_connection(('127.0.0.1', {port}), timeout=1)\n    except Exception:\n"
                           f"        return not ({correct})\n    return {correct}\n"),
        # right answers only if it sees the caller's environment
        "env_spy": f"import os\ndef evaluate(response):\n    return os.environ.get('IFF_TEST_SECRET') == 's3cret' and {correct}\n",
        # right answers, but tries to write to the host first: must stay inside the sandbox
        "writer": (f"def evaluate(response):\n    try:\n        open({str(host_file)!r}, 'w').write('x')\n"
                   f"    except Exception:\n        pass\n    return {correct}\n"),
    }
    try:
        r = cross_validate([GOOD] + list(malicious.values()), CASES[:4], pool,
                           CrossValConfig(min_candidate_functions=1, min_candidate_cases=1))
    finally:
        stop.set()
        t.join()
        srv.close()
        del os.environ["IFF_TEST_SECRET"]
    assert r.kept and set(r.functions) == {GOOD, malicious["writer"]}
    assert r.dropped.get("timeout") == 1  # the endless loop was killed
    assert sum(r.dropped.values()) == 3  # loop, memory bomb and the process that exits at load
    assert not hits, "a verifier reached the host network"
    assert not host_file.exists(), "a verifier wrote to the host file system"


def test_uses_network_static_check():
    assert uses_network(NETWORK) and uses_network("import urllib.request\n") and uses_network("download(x)")
    assert not uses_network(GOOD) and not uses_network("import re, string, json\n")


def test_parse_verifier_reply_variants():
    assert parse_verifier_reply("no json here") == (None, [])
    assert parse_verifier_reply('{"func": "def evaluate(response): return True", "cases": [') == (None, [])
    f, cs = parse_verifier_reply('```json\n{"func": "def evaluate(r):\\n    return True", "cases": '
                                 '[{"input": "a", "output": true}, {"input": 3, "output": false}, {"input": "b", "output": "no"}]}\n```')
    assert f is None or "def evaluate" in f
    assert cs == [{"input": "a", "output": True}]  # the malformed cases are dropped, the valid one kept
    f, cs = parse_verifier_reply('{"func": "def check(x): return 1", "cases": []}')
    assert f is None  # no evaluate function


def test_pass_rates_and_evaluator(pool):
    lower = ["def evaluate(response):\n    return response == response.lower()\n",
             "def evaluate(response):\n    return not any(c.isupper() for c in response)\n"]
    assert pass_rates(lower, ["abc", "Abc"], pool) == [1.0, 0.0]
    broken = lower[:1] + ["def evaluate(response):\n    raise ValueError('x')\n"]
    assert pass_rates(broken, ["abc"], pool) == [0.5]  # an error is a failed check
    assert evaluate_response(lower, "all quiet") == 1.0 and evaluate_response(lower, "Loud", pool) == 0.0


# ---------------------------------------------------------------- the stage, scripted

BANANA = "Mention the word 'banana' at least once."
BANANA_FUNCS = ["def evaluate(response):\n    return 'banana' in response.lower()\n",
                "import re\ndef evaluate(response):\n    return re.search('banana', response, re.I) is not None\n"]
BANANA_CASES = [{"input": "I like banana", "output": True}, {"input": "Banana!", "output": True},
                {"input": "apple", "output": False}, {"input": "nothing here", "output": False}]


def iff_reply(prompt, j):
    text = prompt[-1]["content"]
    if text.startswith("Here are instructions"):  # augmentation
        if "Answer in fewer than 50 words." in text.split("\n")[1]:
            return "Sorry, I cannot."  # malformed
        return json.dumps([BANANA, "End every sentence with an exclamation mark!", "Do not use any commas in your response."])
    if text.startswith("Instruction:"):  # verifier generation
        if BANANA in text:
            if j < 2:
                return "```json\n" + json.dumps({"func": BANANA_FUNCS[j], "cases": BANANA_CASES}) + "\n```"
            if j == 2:
                return json.dumps({"func": "import socket\n" + BANANA_FUNCS[0], "cases": BANANA_CASES})
            return '{"func": "def evaluate(response):'  # truncated
        return "I would write a function that checks it."  # malformed: seeds keep their shipped verifiers
    if text.startswith("This Python function"):  # back-translation
        return "Follow the rule."
    if text.startswith("Instruction A:"):  # consistency
        if "commas" in text:
            return '{"consistent": false}'
        return "hmm" if "lowercase" in text else 'Sure: {"consistent": true}'
    if text.startswith("You are an expert at judging"):  # quality rating
        return QUALITY.get(rated_response(text), "Helpful and on topic.\nScore: 9")
    return ["a ripe banana is all good", "Hello, World", "Hello", "a ripe banana is all good"][j]


QUALITY = {"Hello, World": "Off topic.\nScore: 5", "Hello": "Looks fine to me."}  # below 8; unparseable


def rated_response(quality_prompt_text: str) -> str:
    """The response a quality-rating prompt asks about."""
    return quality_prompt_text.split("[Response] ", 1)[1].split("\nThe response must", 1)[0]


@pytest.fixture
def small_seeds(tmp_path):
    keep = {"all-lowercase", "no-commas", "len-under-50-words"}
    rows = [json.loads(x) for x in SEEDS.read_text().splitlines() if json.loads(x)["id"] in keep]
    p = tmp_path / "seeds.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    q = tmp_path / "queries.jsonl"
    q.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about topic {i}."}) + "\n" for i in range(3)))
    return p, q


def stage(seeds, queries, **kw):
    return {"kind": "if_feedback", "seeds": str(seeds), "queries": str(queries), "augment_prompts": 3,
            "examples_per_prompt": 3, "cross_validation": {"min_candidate_functions": 2, "min_candidate_cases": 4},
            "queries_per_instruction": 2, "responses_per_prompt": 4, **kw}


def test_stage_scripted(tmp_path, small_seeds):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"id": "h1", "prompt": "Describe a market."}) + "\n")
    m = run_recipe(tmp_path, [stage(*small_seeds, eval_queries=str(held_out))], ScriptedSampler(iff_reply))
    out = tmp_path / "out/if_feedback"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["augment"]["prompts"] == 3 and stats["augment"]["new"] == 2 and stats["augment"]["duplicates"] >= 1
    assert stats["augment"]["malformed"] + stats["augment"]["proposed"] // 3 == 3
    cv = stats["cross_validation"]
    assert cv["instructions"] == 5 and cv["kept"] == 4 and cv["dropped_too_few_candidates"] == 1  # exclamation: no verifiers
    assert cv["functions_dropped_network"] == 1 and cv["functions_kept"] == 8
    # both kept functions of each of the 4 instructions are back-translated: no-commas is judged inconsistent,
    # lowercase's verdicts do not parse (counted, and the instruction is dropped, not kept unjudged)
    assert stats["back_translation"] == {"instructions": 4, "functions_checked": 8, "consistent": 4, "inconsistent": 2,
                                         "unparsed": 2, "kept": 2, "dropped_inconsistent": 1, "dropped_unparsed": 1}
    verifiers = load_verifiers(out / "verifiers.jsonl")
    assert {v["instruction"] for v in verifiers} == {BANANA, "Answer in fewer than 50 words."}
    assert all(len(v["functions"]) == 2 for v in verifiers)
    # per prompt (pass rates): under-50 [1, 1, 1, dup], banana [1, 0, 0, dup]; quality ratings: "a ripe banana.." 9,
    # "Hello, World" 5 (below 8), "Hello" unparseable: only "a ripe banana is all good" is a demonstration / chosen
    assert stats["quality"] == {"rated": 2 * 3 + 2 * 1, "passed": 4, "below_min": 2, "unparsed": 2}
    demos = read_records(out / "demonstrations.jsonl", "demonstration")
    prefs = read_records(out / "preferences.jsonl", "preference")
    assert len(demos) == 2 + 2 and len(prefs) == 2 * 2  # banana: 1 chosen x 2 rejected per prompt
    summary = m["if_feedback"]["summary"]
    assert summary["demonstrations"] == 4 and stats["responses"]["responses"] == 4 * 4
    assert summary["back_translation_unparsed"] == 2 and summary["quality_unparsed"] == 2
    assert len({(p["prompt"][-1]["content"], p["rejected"][0]["content"]) for p in prefs}) == 4
    for p in prefs:
        assert p["chosen"][0]["content"] == "a ripe banana is all good" and p["meta"]["rejected_pass_rate"] == 0.0
        assert p["meta"]["constraint"] == BANANA and p["meta"]["quality_score"] == 9
        assert p["rejected"][0]["content"] in {"Hello, World", "Hello"}
        assert p["prompt"][-1]["content"].endswith(p["meta"]["constraint"])
    for d in demos:
        assert d["meta"]["pass_rate"] == 1.0 and d["meta"]["quality_score"] == 9
        assert d["messages"][-1]["content"] == "a ripe banana is all good"
        v = next(v for v in verifiers if v["id"] == d["meta"]["instruction_id"])
        assert d["messages"][0]["content"].endswith("\n\n" + v["instruction"])
    # held-out prompts for `posttrain eval`: one per kept constraint, scored by posttrain.evaluation.evaluate
    from reward.if_verifiers import evaluate_response as if_pass_rate
    ev = read_records(out / "eval_prompts.jsonl", "prompt")
    assert len(ev) == 2 and {e["meta"]["instruction_id"] for e in ev} == {v["id"] for v in verifiers}
    e = next(e for e in ev if e["meta"]["constraint"] == BANANA)
    assert e["prompt"][-1]["content"] == "Describe a market.\n\n" + BANANA
    assert if_pass_rate(e["meta"]["verifiers"], "a banana stall") == 1.0
    # the saved verifiers work as an evaluator
    banana = next(v for v in verifiers if v["instruction"] == BANANA)
    assert evaluate_response(banana["functions"], "one banana") == 1.0 and evaluate_response(banana["functions"], "kiwi") == 0.0


def test_bad_seed_file_names_line(tmp_path, small_seeds):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "x"}\n{"id": "b", "instruction": "y", "cases": [{"input": 1}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'cases' must be a list"):
        load_seeds(bad)


def test_verdict_parsers():
    assert parse_consistency('```json\n{"consistent": false}\n```') is False
    assert parse_consistency('They agree. {"consistent": true}') is True
    assert parse_consistency("hmm") is None and parse_consistency('{"consistent": "yes"}') is None
    assert parse_quality_score("Good.\nScore: 8") == 8 and parse_quality_score("**Score:** 7/10") == 7
    assert parse_quality_score("Score: 3\nScore: 9") == 9  # the last line's score counts
    for bad in ("Looks fine.", "Score: 0", "Score: 11", "", None):
        assert parse_quality_score(bad) is None


def second_function_inconsistent(prompt, j):
    """``iff_reply``, but banana's 2nd kept function (the regex one) back-translates to a contradiction."""
    text = prompt[-1]["content"]
    if text.startswith("This Python function") and "re.search('banana'" in text:
        return "Never mention bananas."
    if text.startswith("Instruction A:") and "Never mention bananas." in text:
        return '{"consistent": false}'
    return iff_reply(prompt, j)


@pytest.mark.parametrize("n_functions,banana_kept,checked", [(3, False, 8), (1, True, 4)])
def test_back_translation_checks_up_to_n_functions(tmp_path, small_seeds, n_functions, banana_kept, checked):
    st = stage(*small_seeds, back_translate_functions=n_functions, queries_per_instruction=1, responses_per_prompt=1)
    run_recipe(tmp_path, [st], ScriptedSampler(second_function_inconsistent))
    out = tmp_path / "out/if_feedback"
    bt = json.loads((out / "stats.json").read_text())["back_translation"]
    assert bt["functions_checked"] == checked  # every instruction has 2 kept functions
    assert bt["dropped_inconsistent"] == (1 if banana_kept else 2)  # no-commas, and banana when its 2nd is checked
    assert (BANANA in {v["instruction"] for v in load_verifiers(out / "verifiers.jsonl")}) == banana_kept


PAIR_RESPONSES = ["banana one", "banana two", "banana three", "banana low", "kiwi a", "kiwi b", "kiwi c", "banana one"]


def pairs_reply(prompt, j):
    """Only banana survives back-translation; 8 responses per prompt: 4 distinct passing ones (one rated 5, one rated
    exactly 8) and 3 failing ones."""
    text = prompt[-1]["content"]
    if text.startswith("Instruction A:"):
        return json.dumps({"consistent": "banana" in text.split("\n")[0]})
    if text.startswith("You are an expert at judging"):
        return {"banana low": "Score: 5", "banana three": "Score: 8"}.get(rated_response(text), "Score: 10")
    if text.startswith(("Here are", "Instruction:", "This Python")):
        return iff_reply(prompt, j)
    return PAIR_RESPONSES[j]


def test_quality_filter_and_pairs_per_prompt(tmp_path, small_seeds):
    st = stage(*small_seeds, responses_per_prompt=len(PAIR_RESPONSES))  # max_pairs_per_prompt: AutoIF's 4 (default)
    m = run_recipe(tmp_path, [st], ScriptedSampler(pairs_reply))
    out = tmp_path / "out/if_feedback"
    assert [v["instruction"] for v in load_verifiers(out / "verifiers.jsonl")] == [BANANA]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["quality"] == {"rated": 2 * 4, "passed": 2 * 3, "below_min": 2, "unparsed": 0}
    # a response rated >= 8 is a demonstration (8 included), the one rated 5 is not, though it passes every verifier
    demos = read_records(out / "demonstrations.jsonl", "demonstration")
    assert sorted(d["messages"][-1]["content"] for d in demos) == sorted(["banana one", "banana two", "banana three"] * 2)
    # 3 chosen x 3 rejected per prompt: the first 4 distinct pairs, the 2 best chosen x the 2 first rejected
    prefs = read_records(out / "preferences.jsonl", "preference")
    assert len(prefs) == 2 * 4 == m["if_feedback"]["summary"]["preferences"]
    by_prompt: dict[str, set] = {}
    for p in prefs:
        by_prompt.setdefault(p["prompt"][-1]["content"], set()).add((p["chosen"][0]["content"], p["rejected"][0]["content"]))
    assert len(by_prompt) == 2
    for pairs in by_prompt.values():
        assert pairs == {(c, r) for c in ("banana one", "banana two") for r in ("kiwi a", "kiwi b")}
    # fewer pairs asked for: that many; more: every chosen x rejected combination, never the low-rated response
    for n, want in [(2, 2), (16, 9)]:
        m = run_recipe(tmp_path, [{**st, "max_pairs_per_prompt": n}], ScriptedSampler(pairs_reply), out=f"out{n}")
        prefs = read_records(tmp_path / f"out{n}/if_feedback/preferences.jsonl", "preference")
        assert len(prefs) == len({(p["prompt"][-1]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"])
                                  for p in prefs}) == 2 * want
        assert "banana low" not in {p["chosen"][0]["content"] for p in prefs}


# ---------------------------------------------------------------- kill and resume

# chunk_size 2: augment (3 prompts) = sampler calls 1-2, verifiers (5 instructions) 3-5, back_translation (4
# instructions x 2 functions) 6-9, consistency (8) 10-13, responses (4 prompts) 14-15, quality (8 responses) 16-19;
# the sandbox steps crossval (5) and scores (4) run 3 and 2 chunks (``_each`` calls 1-3 and 4-5).
CHUNKED = {"chunk_size": 2}
STEP_ORDER = ["augment", "verifiers", "crossval", "back_translation", "consistency", "responses", "scores", "quality"]
RECORD_FILES = ["demonstrations.jsonl", "preferences.jsonl", "verifiers.jsonl", "eval_prompts.jsonl", "stats.json"]


def _killed_run(tmp: str, stage_json: str, at: str, n: int) -> None:
    """Child process of ``test_kill_and_resume``: run the stage and SIGKILL itself at the ``n``-th sampler call
    (``at="generate"``) or the ``n``-th sandbox chunk (``at="_each"``): no cleanup, no flush, as a real kill."""
    import itertools
    import signal

    count = itertools.count(1)

    def die_at_n() -> None:
        if next(count) == n:
            os.kill(os.getpid(), signal.SIGKILL)

    class Dying(ScriptedSampler):
        def generate(self, prompts, params, seeds=None):
            if at == "generate":
                die_at_n()
            return super().generate(prompts, params, seeds)

    real_each = if_feedback._each

    def dying_each(*a, **k):
        if at == "_each":
            die_at_n()
        return real_each(*a, **k)

    if_feedback._each = dying_each
    run_recipe(Path(tmp), [json.loads(stage_json)], Dying(iff_reply), out="resumed")
    raise SystemExit("not killed")


def _steps(d: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in (d / "steps").glob("*.jsonl")}


@pytest.mark.parametrize("at,n,step,committed,again_calls", [
    ("generate", 15, "responses", 2, {"generate": 1 + 4, "cross_validate": 0, "pass_rates": 4}),  # responses 2 of 2
    ("_each", 3, "crossval", 4, {"generate": 4 + 4 + 2 + 4, "cross_validate": 1, "pass_rates": 4}),  # crossval 3 of 3
    ("_each", 5, "scores", 2, {"generate": 4, "cross_validate": 0, "pass_rates": 2}),  # scores chunk 2 of 2
    ("generate", 18, "quality", 4, {"generate": 2, "cross_validate": 0, "pass_rates": 0}),  # quality chunk 3 of 4
])
def test_kill_and_resume(tmp_path, small_seeds, monkeypatch, at, n, step, committed, again_calls):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"id": "h1", "prompt": "Describe a market."}) + "\n")
    st = stage(*small_seeds, eval_queries=str(held_out), **CHUNKED)
    ref = ScriptedSampler(iff_reply)
    m_clean = run_recipe(tmp_path, [st], ref, out="clean")
    assert len(ref.calls) == 19
    out, clean = tmp_path / "resumed/if_feedback", tmp_path / "clean/if_feedback"
    want_steps = _steps(clean)
    assert sorted(want_steps) == sorted(STEP_ORDER)
    # a real SIGKILL in a child process: nothing is closed or flushed on the way out
    code = f"from tests.test_if_feedback import _killed_run; _killed_run({str(tmp_path)!r}, {json.dumps(st)!r}, {at!r}, {n})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the steps before the killed one are committed as the uninterrupted run has them; the killed step holds
    # exactly its finished chunks; later steps never started; no record file, no stats
    got = _steps(out)
    i = STEP_ORDER.index(step)
    assert sorted(got) == sorted(STEP_ORDER[: i + 1])
    for name in STEP_ORDER[:i]:
        assert got[name] == want_steps[name], name
    assert got[step] == want_steps[step][:committed]
    for f in RECORD_FILES:
        assert not (out / f).exists(), f
    # resume: only what is missing runs again
    calls = {"cross_validate": 0, "pass_rates": 0}

    def counting(name):
        real = getattr(if_feedback, name)

        def f(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return f
    for name in calls:
        monkeypatch.setattr(if_feedback, name, counting(name))
    again = ScriptedSampler(iff_reply)
    m = run_recipe(tmp_path, [st], again, out="resumed")
    assert {"generate": len(again.calls), **calls} == again_calls
    assert m["if_feedback"]["summary"] == m_clean["if_feedback"]["summary"]
    # every step cache holds each item once, the same as the uninterrupted run's: nothing lost, no duplicates
    got = _steps(out)
    assert sorted(got) == sorted(want_steps)
    for name, want in want_steps.items():
        assert len({r["k"] for r in got[name]}) == len(got[name]) and want, name
        assert sorted(got[name], key=lambda r: r["k"]) == sorted(want, key=lambda r: r["k"]), name
    for f in RECORD_FILES[:-1]:
        rows = [json.loads(x) for x in (out / f).read_text().splitlines()]
        want = [json.loads(x) for x in (clean / f).read_text().splitlines()]
        assert len({r["id"] for r in rows}) == len(rows) and want, f
        assert sorted(rows, key=lambda r: r["id"]) == sorted(want, key=lambda r: r["id"]), f
    assert json.loads((out / "stats.json").read_text()) == json.loads((clean / "stats.json").read_text())


# ---------------------------------------------------------------- too little usable output

def garbage_reply(prompt, j):
    return "<|endoftext|> the the the"  # a dead template: nothing parses


def no_responses_reply(prompt, j):
    text = prompt[-1]["content"]
    return iff_reply(prompt, j) if text.startswith(("Here are", "Instruction", "This Python")) else "  "


def no_verdicts_reply(prompt, j):
    return "I cannot tell." if prompt[-1]["content"].startswith("Instruction A:") else iff_reply(prompt, j)


def no_ratings_reply(prompt, j):
    return "Nice answer." if prompt[-1]["content"].startswith("You are an expert at judging") else iff_reply(prompt, j)


@pytest.mark.parametrize("reply,what,stopped_before", [
    (garbage_reply, r"only 0 of 12 verifier replies with a function or test cases", "crossval"),
    (no_verdicts_reply, r"only 0 of 8 parseable consistency verdicts", "responses"),
    (no_responses_reply, r"only 0 of 16 non-empty responses", "scores"),
    (no_ratings_reply, r"only 0 of 8 parseable quality ratings", None),  # the last step
])
def test_low_success_rate_writes_nothing(tmp_path, small_seeds, reply, what, stopped_before):
    from data_synthesis.common import LowSuccessRate

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"id": "h1", "prompt": "Describe a market."}) + "\n")
    with pytest.raises(LowSuccessRate, match=what + r" .* min_success_rate=0.05; nothing was written"):
        run_recipe(tmp_path, [stage(*small_seeds, eval_queries=str(held_out))], ScriptedSampler(reply))
    out = tmp_path / "out/if_feedback"
    for f in RECORD_FILES:
        assert not (out / f).exists(), f
    if stopped_before:
        assert not (out / "steps" / f"{stopped_before}.jsonl").exists()  # the stage stopped at the failing step


# ---------------------------------------------------------------- real tiny model through vLLM

def test_if_feedback_real_vllm(tmp_path, vllm_sampler, pool):
    q = tmp_path / "queries.jsonl"
    q.write_text((ROOT / "recipes/data/prompts.jsonl").read_text())
    st = {"kind": "if_feedback", "seeds": str(SEEDS), "queries": str(q), "augment_prompts": 1,
          "min_success_rate": 0,  # the random tiny model writes no usable verifier, verdict or rating
          # its unparseable consistency verdicts would drop every instruction: the shipped verifiers go on unchecked
          "back_translate": False,
          "functions_per_instruction": 1, "cross_validation": {"min_candidate_functions": 2, "min_candidate_cases": 4},
          "queries_per_instruction": 1, "responses_per_prompt": 3, "require_stop": False,
          "sampling": {"temperature": 1.0, "max_tokens": 24, "seed": 0},
          "judge_sampling": {"temperature": 0.0, "max_tokens": 12, "seed": 0}}
    m = run_recipe(tmp_path, [st], vllm_sampler)
    out = tmp_path / "out/if_feedback"
    stats = json.loads((out / "stats.json").read_text())
    n_seeds = len(load_seeds(SEEDS))
    assert stats["verifiers"]["replies"] == stats["cross_validation"]["instructions"] >= n_seeds
    kept = load_verifiers(out / "verifiers.jsonl")
    assert len(kept) == m["if_feedback"]["summary"]["kept_instructions"] >= 1  # shipped seed verifiers survive
    assert stats["responses"]["prompts"] == len(kept) and stats["responses"]["responses"] == 3 * len(kept)
    demos = read_records(out / "demonstrations.jsonl", "demonstration")
    by_id = {v["id"]: v for v in kept}
    for d in demos[:5]:  # the recorded pass rate is what the saved evaluator gives
        v = by_id[d["meta"]["instruction_id"]]
        assert evaluate_response(v["functions"], d["messages"][-1]["content"], pool) == d["meta"]["pass_rate"] == 1.0
    # the same on the cached responses and pass rates (the tiny model's ratings rarely parse: few or no demonstrations)
    steps = {name: {r["k"]: r["v"] for r in rows} for name, rows in _steps(out).items()}
    checked = [(v, comp["text"], rate) for v in kept for row in map(json.loads, q.read_text().splitlines())
               if (k := record_id("ifp", v["id"], row["id"])) in steps["scores"]
               for comp, rate in zip(steps["responses"][k], steps["scores"][k])]
    assert len(checked) == 3 * len(kept)
    for v, text, rate in checked[:5]:
        assert evaluate_response(v["functions"], text, pool) == rate
    for p in read_records(out / "preferences.jsonl", "preference"):
        assert p["meta"]["chosen_pass_rate"] >= 0.5 and p["meta"]["rejected_pass_rate"] == 0.0
        assert p["meta"]["quality_score"] >= 8
    # the quality step ran on the real model: every candidate is rated, its unparseable ratings counted
    q = stats["quality"]
    assert q["rated"] == q["passed"] + q["below_min"] + q["unparsed"]
    assert m["if_feedback"]["summary"]["quality_unparsed"] == q["unparsed"]
    assert len(demos) <= q["passed"]
