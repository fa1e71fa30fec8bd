"""Stage ``if_feedback``: verifier cross-validation on hand-made functions with known outcomes (in the real
sandbox), malicious verifiers contained, pass rates / evaluator, the whole stage with a scripted sampler
(malformed JSON included), kill-and-resume, and one real run on the tiny model through vLLM."""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest

from data_synthesis import if_feedback
from data_synthesis.if_feedback import load_seeds, parse_verifier_reply
from reward.if_verifiers import (CrossValConfig, cross_validate, evaluate_response, load_verifiers, pass_rates,
                                 uses_network)
from reward.sandbox import SandboxLimits, SandboxPool
from posttrain.stages import load_recipe, recipe_from_dict
from posttrain.core.records import read_records
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
        return '{"consistent": true}' if "banana" in text else "hmm"
    return ["a ripe banana is all good", "Hello, World", "Hello", "a ripe banana is all good"][j]


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
    assert stats["back_translation"] == {"checked": 4, "inconsistent": 1, "consistent": 1, "unjudged_kept": 2}
    verifiers = load_verifiers(out / "verifiers.jsonl")
    assert {v["instruction"] for v in verifiers} == {BANANA, "Answer in fewer than 50 words.",
                                                     "Your entire response must be in lowercase letters; no capital letters are allowed."}
    assert all(len(v["functions"]) == 2 for v in verifiers)
    # per prompt: lowercase [1, 0, 0, dup], under-50 [1, 1, 1, dup], banana [1, 0, 0, dup]
    demos = read_records(out / "demonstrations.jsonl", "demonstration")
    prefs = read_records(out / "preferences.jsonl", "preference")
    assert len(demos) == 2 + 6 + 2 and len(prefs) == 2 + 2
    assert m["if_feedback"]["summary"]["demonstrations"] == 10 and stats["responses"]["responses"] == 6 * 4
    for p in prefs:
        assert p["chosen"][0]["content"] == "a ripe banana is all good" and p["meta"]["rejected_pass_rate"] == 0.0
        assert p["prompt"][-1]["content"].endswith(p["meta"]["constraint"])
    for d in demos:
        assert d["meta"]["pass_rate"] == 1.0
        v = next(v for v in verifiers if v["id"] == d["meta"]["instruction_id"])
        assert d["messages"][0]["content"].endswith("\n\n" + v["instruction"])
    # held-out prompts for `posttrain eval`: one per kept constraint, scored by posttrain.evaluation.evaluate
    from reward.if_verifiers import evaluate_response as if_pass_rate
    ev = read_records(out / "eval_prompts.jsonl", "prompt")
    assert len(ev) == 3 and {e["meta"]["instruction_id"] for e in ev} == {v["id"] for v in verifiers}
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


class Crashing:
    """Wraps a sampler; raises on generate call number ``crash_at`` (1-based), counts calls."""

    name = "crashing"

    def __init__(self, inner, crash_at: int | None):
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    def generate(self, prompts, params):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise RuntimeError("killed")
        return self.inner.generate(prompts, params)

    def close(self):
        pass


def test_kill_and_resume(tmp_path, small_seeds, monkeypatch):
    ref = Crashing(ScriptedSampler(iff_reply), None)
    run_recipe(tmp_path, [stage(*small_seeds)], ref, out="clean")
    assert ref.calls == 5  # augment, verifiers, back-translation, consistency, responses
    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(tmp_path, [stage(*small_seeds)], Crashing(ScriptedSampler(iff_reply), 5), out="resumed")

    def no_rerun(*a, **k):
        raise AssertionError("cross-validation re-ran although it was cached")
    monkeypatch.setattr(if_feedback, "cross_validate", no_rerun)
    again = Crashing(ScriptedSampler(iff_reply), None)
    run_recipe(tmp_path, [stage(*small_seeds)], again, out="resumed")
    assert again.calls == 1
    for f in ("demonstrations.jsonl", "preferences.jsonl", "verifiers.jsonl"):
        got = [json.loads(x)["id"] for x in (tmp_path / "resumed/if_feedback" / f).read_text().splitlines()]
        want = [json.loads(x)["id"] for x in (tmp_path / "clean/if_feedback" / f).read_text().splitlines()]
        assert len(got) == len(set(got)) and sorted(got) == sorted(want) and want


# ---------------------------------------------------------------- real tiny model through vLLM

def test_if_feedback_real_vllm(tmp_path, vllm_sampler, pool):
    q = tmp_path / "queries.jsonl"
    q.write_text((ROOT / "recipes/data/prompts.jsonl").read_text())
    st = {"kind": "if_feedback", "seeds": str(SEEDS), "queries": str(q), "augment_prompts": 1,
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
    for p in read_records(out / "preferences.jsonl", "preference"):
        assert p["meta"]["chosen_pass_rate"] >= 0.5 and p["meta"]["rejected_pass_rate"] == 0.0
