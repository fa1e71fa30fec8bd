"""Stage ``code_feedback``: execution feedback for code (solutions and tests run in the sandbox).

Input: programming-problem records (``prompt`` or ``messages``) with optional
given tests (``tests_field``, default ``meta.tests``: a list of Python ``assert``
lines, or of ``{"input": [args...], "output": value}`` objects for the function
named in ``entry_point_field``).

Per problem the model writes ``n_solutions`` solutions and (when no tests are given,
or ``generate_tests`` is on) test cases as ``assert`` lines. Every solution runs
against every candidate test in the sandbox (``reward.sandbox``; a pool of
processes, per-test time limit). Model-written tests are cross-checked against the
solutions: a test that no solution passes is discarded, and so is a test that
contradicts the consensus: solutions are grouped by which tests they pass, the group
with the largest agreement (solutions in group x tests passed, as in CodeT) is the
consensus, and tests that group fails are dropped. Given tests are trusted unless
``cross_check_given``. A solution passes when it passes all kept tests.

Output (stage folder, written whole at the end): ``demonstrations.jsonl`` (passing
solutions, distinct code, up to ``max_per_problem``), ``preferences.jsonl`` (passing vs
failing solutions of the same problem), both with pass counts in ``meta``;
``problems.jsonl`` (per-problem counts and the kept tests); ``report.json``.
Resumable: solutions and tests are sampled ``chunk_size`` problems per sampler call and
cached per problem (``steps/solutions.jsonl``, ``steps/tests.jsonl``, seeded per
problem); the sandbox runs of a problem are cached in ``steps/runs.jsonl``. A killed run
redoes only what is missing. Fewer than ``min_success_rate`` solutions with a code block
stop the stage before it writes anything.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, build_prompt, check_success, get_field,
                                   lazy_sampler, map_step, sample_step, sampler_name, step_path, unique_ids)
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec, input_label
from posttrain.core.records import demonstration, preference, record_id, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams
from reward.code_tests import (extract_code, extract_tests, load_failed, normalize_tests, select_tests,
                               test_job)

log = logging.getLogger("posttrain.code_feedback")

SOLUTION_INSTRUCTION = ("\n\nWrite a Python function `{entry_point}` that solves this. Reply with the complete "
                        "code in one ```python block.")
TEST_PROMPT = ("Write {n} test cases for the Python function `{entry_point}` described below, as `assert` "
               "statements, one per line, in one ```python block. Do not write the function itself.\n\n"
               "{problem}")


@dataclass
class CodeFeedbackConfig:
    """Keys of stage ``code_feedback``."""

    input: InputSpec = key(doc="programming problems (prompt records)", input="prompt")
    tests_field: str = key("meta.tests", "dotted path of given tests (assert lines or {input, output} objects)")
    entry_point_field: str = key("meta.entry_point", "dotted path of the function name the tests call")
    n_solutions: int = key(8, "solutions sampled per problem")
    generate_tests: bool = key(False, "also let the model write tests when the problem has some")
    n_test_samples: int = key(2, "test-writing completions per problem (when tests are generated)")
    tests_per_sample: int = key(5, "the number of tests the test prompt asks for")
    max_tests: int = key(20, "at most this many distinct candidate tests per problem")
    min_tests: int = key(1, "problems with fewer kept tests give no records")
    cross_check_given: bool = key(False, "also filter given tests by the solutions' consensus")
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.8, max_tokens=512))
    test_sampling: SamplingParams | None = key(None, "sampling for test writing (default: ``sampling``)")
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    system_prompt: str | None = key(None, "optional system turn for the solution prompt")
    solution_instruction: str = key(SOLUTION_INSTRUCTION, "appended to the problem; {entry_point} is filled in")
    test_prompt: str = key(TEST_PROMPT, "the test-writing prompt; {n}, {entry_point}, {problem} are filled in")
    timeout_s: float = key(10.0, "sandbox wall-clock limit for one solution with all its tests")
    test_timeout_s: float = key(2.0, "limit for a single test (an alarm inside the sandbox)")
    memory_mb: int = key(512, "sandbox address-space limit")
    workers: int | None = key(None, "parallel sandbox processes (default: CPU count)")
    allow_network: bool = key(False, "run code even where the sandbox cannot isolate it (no namespaces): unsafe")
    max_per_problem: int = key(4, "passing solutions kept as demonstrations per problem")
    max_pairs_per_problem: int = key(4, "passing-vs-failing preference pairs per problem")
    chunk_size: int = key(64, CHUNK_DOC + "; also the problems whose sandbox runs go to the pool together")
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: a solution with a code block)")
    limit: int | None = key(None, "use only the first N problems")

    def check(self) -> None:
        """Cross-field checks."""
        if self.n_solutions < 1 or self.chunk_size < 1 or self.min_tests < 1:
            raise ValueError("n_solutions, chunk_size and min_tests must be >= 1")
        if self.timeout_s <= 0 or self.test_timeout_s <= 0:
            raise ValueError("timeout_s and test_timeout_s must be > 0")
        if not 0 <= self.min_success_rate <= 1:
            raise ValueError("min_success_rate must be in [0, 1]")


# ---------------------------------------------------------------- parsing (pure)

def normalize_code(code: str) -> str:
    """Code without comments, docstring-free blank lines and spacing: for deduping solutions."""
    lines = []
    for line in code.splitlines():
        line = re.sub(r"#.*$", "", line).rstrip()
        if line.strip():
            lines.append(re.sub(r"\s+", " ", line))
    return "\n".join(lines)


# ---------------------------------------------------------------- the stage

def _test_prompt(cfg: CodeFeedbackConfig, p: dict) -> list[dict]:
    return [{"role": "user", "content": cfg.test_prompt.replace("{n}", str(cfg.tests_per_sample))
             .replace("{entry_point}", p["entry_point"] or "solution").replace("{problem}", p["text"])}]


def run(cfg: CodeFeedbackConfig, ctx) -> dict:
    """Entry point of stage kind ``code_feedback``."""
    src = input_label(cfg.input)
    problems: dict[str, dict] = {}
    for n, rec in enumerate(ctx.read_input(cfg.input, "prompt"), 1):
        ep = get_field(rec, cfg.entry_point_field)
        tests = normalize_tests(get_field(rec, cfg.tests_field), ep, f"{src}:{n}")
        instr = cfg.solution_instruction.replace("{entry_point}", ep or "solution")
        problems.setdefault(str(rec["id"]), {"id": str(rec["id"]), "prompt": build_prompt(rec, cfg.system_prompt, instr),
                                             "text": rec["prompt"][-1]["content"], "entry_point": ep, "given": tests})
    if cfg.limit is not None:
        problems = dict(list(problems.items())[: cfg.limit])
    get_sampler = lazy_sampler(ctx, cfg.sampler, cfg.model)
    sols = sample_step(ctx, get_sampler, "solutions", {pid: p["prompt"] for pid, p in problems.items()},
                       replace(cfg.sampling, n=cfg.n_solutions), cfg.chunk_size)
    want = {pid: _test_prompt(cfg, p) for pid, p in problems.items() if cfg.generate_tests or not p["given"]}
    written = sample_step(ctx, get_sampler, "tests", want, replace(cfg.test_sampling or cfg.sampling, n=cfg.n_test_samples),
                          cfg.chunk_size) if want else {}
    cand: dict[str, tuple[list[str], list[bool]]] = {}
    codes: dict[str, list[str | None]] = {}
    for pid, p in problems.items():
        tests = list(p["given"])
        trusted = [not cfg.cross_check_given] * len(tests)
        for t in (x for c in written.get(pid, []) for x in extract_tests(c["text"])):
            if t not in tests and len(tests) < max(cfg.max_tests, len(p["given"])):
                tests.append(t)
                trusted.append(False)
        cand[pid] = (tests, trusted)
        codes[pid] = [extract_code(c["text"]) for c in sols[pid]]
    n_sol = sum(len(v) for v in codes.values())
    check_success(ctx.spec.name, "solutions with a code block", sum(c is not None for v in codes.values() for c in v),
                  n_sol, cfg.min_success_rate, [step_path(ctx, "solutions")])
    pool_box: list = []

    def run_chunk(chunk: list[str]) -> list[dict]:
        from reward.sandbox import SandboxLimits, SandboxPool

        if not pool_box:
            pool_box.append(SandboxPool(cfg.workers, SandboxLimits(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb,
                                                                   allow_network=cfg.allow_network)))
        jobs, owners = [], []
        for pid in chunk:
            for j, code in enumerate(codes[pid]):
                if code is not None and cand[pid][0]:
                    jobs.append(test_job(code, cand[pid][0], cfg.test_timeout_s))
                    owners.append((pid, j))
        out: dict[str, dict] = {pid: {} for pid in chunk}
        for (pid, j), (res, vals) in zip(owners, pool_box[0].call_many(jobs)):
            out[pid][str(j)] = [res.status, vals]
        return [out[pid] for pid in chunk]

    try:
        runs = map_step(ctx, "runs", list(problems), run_chunk, cfg.chunk_size)
    finally:
        if pool_box:
            pool_box[0].close()
    source = f"code_feedback:{sampler_name(ctx, cfg.sampler)}"
    demos: list[dict] = []
    prefs: list[dict] = []
    rows = []
    for pid, p in problems.items():
        r = {int(j): v for j, v in runs[pid].items()}
        st = _judge_problem(p, [c["text"] for c in sols[pid]], codes[pid], cand[pid], r, cfg, demos, prefs, source)
        rows.append({"id": pid, "prompt": p["prompt"], "source": source, "meta": st})
    demos, prefs = unique_ids(demos), unique_ids(prefs)
    write_records(ctx.out_dir / "demonstrations.jsonl", demos, "demonstration")
    write_records(ctx.out_dir / "preferences.jsonl", prefs, "preference")
    write_records(ctx.out_dir / "problems.jsonl", rows, "prompt")
    return _report(ctx, [r["meta"] for r in rows], len(demos), len(prefs))


def _judge_problem(p: dict, texts: list[str], codes: list[str | None], cand: tuple[list[str], list[bool]],
                   runs: dict[int, list], cfg: CodeFeedbackConfig, demos: list[dict], prefs: list[dict],
                   source: str) -> dict:
    tests, trusted = cand
    # pass matrix over solutions that ran (a crash of the whole process fails every test)
    ran = sorted(runs)
    matrix = [[v is True for v in runs[j][1]] for j in ran]
    loaded = [r for j, r in zip(ran, matrix) if not load_failed(runs[j][1])]
    kept, discarded = select_tests(loaded, trusted)
    passed = {j: sum(matrix[ran.index(j)][t] for t in kept) if j in runs else 0 for j in range(len(texts))}
    ok = [j for j in range(len(texts)) if j in runs and len(kept) >= cfg.min_tests and passed[j] == len(kept)]
    status = {j: ("malformed" if codes[j] is None else "pass" if j in ok else "untested" if j not in runs else
                  runs[j][0] if runs[j][0] != "ok" else "fail") for j in range(len(texts))}
    prompt = p["prompt"]

    def meta(j: int) -> dict:
        return {"problem_id": p["id"], "passed": passed[j], "total": len(kept), "status": status[j]}

    seen, keep = set(), []
    for j in ok:
        k = normalize_code(codes[j] or "")
        if k not in seen and len(keep) < cfg.max_per_problem:
            seen.add(k)
            keep.append(j)
    for j in keep:
        demos.append(demonstration(prompt + [{"role": "assistant", "content": texts[j]}], source=source,
                                   id=record_id("cf-demo", p["id"], texts[j]),
                                   meta={**meta(j), "n_passing": len(ok), "n_solutions": len(texts)}))
    # failing: most-passed first (hard negatives), then errors, malformed last; distinct texts only
    fails, fseen = [], set()
    for j in sorted((j for j in range(len(texts)) if j not in ok), key=lambda j: (codes[j] is None, -passed[j], j)):
        if texts[j].strip() and texts[j] not in fseen:
            fseen.add(texts[j])
            fails.append(j)
    pairs = []
    if keep and fails and len(kept) >= cfg.min_tests:
        for i in range(min(cfg.max_pairs_per_problem, max(len(keep), len(fails)))):
            a, b = keep[i % len(keep)], fails[i % len(fails)]
            prefs.append(preference(prompt, texts[a], texts[b], source=source, margin=(passed[a] - passed[b]) / len(kept),
                                    id=record_id("cf-pref", p["id"], texts[a], texts[b]),
                                    meta={"problem_id": p["id"], "chosen_passed": passed[a],
                                          "rejected_passed": passed[b], "total": len(kept),
                                          "rejected_status": status[b]}))
            pairs.append((a, b))
    return {"problem_id": p["id"], "solutions": len(texts), "malformed": sum(c is None for c in codes),
            "tests_given": len(p["given"]), "tests_candidate": len(tests), "tests_kept": len(kept),
            "tests_no_solution_passes": len(discarded["no_solution_passes"]),
            "tests_against_consensus": len(discarded["against_consensus"]),
            "passing": len(ok), "kept": len(keep), "pairs": len(pairs),
            "pass_counts": [passed[j] for j in range(len(texts))], "status": [status[j] for j in range(len(texts))],
            "kept_tests": [tests[t] for t in kept]}


def _report(ctx, rows: list[dict], n_demo: int, n_pref: int) -> dict:
    n_sol = sum(r["solutions"] for r in rows)
    summary = {
        "problems": len(rows),
        "problems_with_passing": sum(r["passing"] > 0 for r in rows),
        "solution_pass_rate": round(sum(r["passing"] for r in rows) / n_sol, 4) if n_sol else None,
        "malformed_rate": round(sum(r["malformed"] for r in rows) / n_sol, 4) if n_sol else None,
        "tests_candidate": sum(r["tests_candidate"] for r in rows),
        "tests_kept": sum(r["tests_kept"] for r in rows),
        "demonstrations": n_demo,
        "preferences": n_pref,
    }
    ctx.write_json("report.json", {**summary, "per_problem": rows})
    return summary
