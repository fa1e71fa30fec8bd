"""Code tests as a judge: extract code and tests from replies, run tests against code in the sandbox.

Input: model replies (code in fenced blocks, ``assert`` lines) and test lists (assert lines,
or ``{"input": args, "output": value}`` objects for a named function). Output: the code
(``extract_code``), tests (``extract_tests``, ``normalize_tests``), a sandbox job running each
test against a solution (``test_job``), the pass rate of a response (``code_pass_rate``, used by
evaluation), and the CodeT-style consensus that decides which model-written tests to trust
(``select_tests``). Used by stage ``code_feedback`` and by ``eval``.
"""

from __future__ import annotations

import re

from posttrain.core.text import fenced_blocks
from reward.sandbox import RUN_TESTS


def extract_code(text: str) -> str | None:
    """The last ```python (or unlabeled) fenced block; the whole text if it plainly is code; else None."""
    blocks = fenced_blocks(text)
    py = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
    if py:
        return py[-1].strip("\n") + "\n"
    if re.search(r"^\s*(def|class|import|from)\s", text or "", re.MULTILINE):
        return text.strip("\n") + "\n"
    return None


def extract_tests(text: str) -> list[str]:
    """One-line ``assert`` statements in a completion (inside code blocks or not), in order, distinct."""
    seen, out = set(), []
    for line in (text or "").splitlines():
        s = line.strip()
        if s.startswith("assert ") and s not in seen:
            try:
                compile(s, "<test>", "exec")
            except SyntaxError:
                continue
            seen.add(s)
            out.append(s)
    return out


def normalize_tests(raw: object, entry_point: str | None, where: str) -> list[str]:
    """Given tests as assert lines; ``{"input": args, "output": value}`` objects need ``entry_point``."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"{where}: tests must be a list, got {type(raw).__name__}")
    out = []
    for i, t in enumerate(raw):
        if isinstance(t, str):
            out.append(t.strip())
        elif isinstance(t, dict) and "input" in t and "output" in t:
            if not entry_point:
                raise ValueError(f"{where}: tests[{i}] is an input/output pair but the record has no entry point")
            args = t["input"] if isinstance(t["input"], list) else [t["input"]]
            out.append(f"assert {entry_point}(*{args!r}) == {t['output']!r}")
        else:
            raise ValueError(f"{where}: tests[{i}] must be an assert string or {{input, output}}")
    return out


def select_tests(matrix: list[list[bool]], trusted: list[bool]) -> tuple[list[int], dict[str, list[int]]]:
    """Cross-check tests against solutions.

    ``matrix[s][t]``: solution s passes test t (only solutions that loaded). Returns the kept
    test indices and the discarded ones by reason (``no_solution_passes``, ``against_consensus``).
    """
    n_tests = len(trusted)
    if not matrix:
        return [t for t in range(n_tests) if trusted[t]], {"no_solution_passes": [], "against_consensus": []}
    none_pass = [t for t in range(n_tests) if not trusted[t] and not any(row[t] for row in matrix)]
    alive = [t for t in range(n_tests) if t not in none_pass]
    groups: dict[tuple[bool, ...], int] = {}
    for row in matrix:
        key = tuple(row[t] for t in alive)
        groups[key] = groups.get(key, 0) + 1
    # consensus: the largest agreement (solutions in the group x tests they pass); ties -> more tests
    best = max(groups, key=lambda k: (groups[k] * sum(k), sum(k), groups[k]))
    kept = [t for t, ok in zip(alive, best) if ok or trusted[t]]
    against = [t for t in alive if t not in kept]
    return kept, {"no_solution_passes": none_pass, "against_consensus": against}


def test_job(code: str, tests: list[str], test_timeout_s: float) -> tuple[str, str, list[str], float]:
    """A ``call_function`` / ``SandboxPool.call_many`` job running each test against ``code``.

    The tests run in the sandbox's judge, apart from the solution's process (see
    ``reward.sandbox_judge``): a solution cannot fake passing tests; each test gets ``test_timeout_s``.
    """
    return code, RUN_TESTS, list(tests), float(test_timeout_s)


def code_pass_rate(response: str, tests: list[str], *, test_timeout_s: float = 5.0) -> float:
    """Fraction of ``tests`` (assert statements) that the code in ``response`` passes, run in the sandbox.

    Used by evaluation; a response without a code block, or whose process dies, scores 0.
    """
    code = extract_code(response)
    if code is None or not tests:
        return 0.0
    from reward.sandbox import SandboxLimits, call_function

    limits = SandboxLimits(timeout_s=(test_timeout_s + 1) * len(tests) + 5)
    _, outcomes = call_function(*test_job(code, tests, test_timeout_s), limits=limits)
    return sum(v is True for v in outcomes) / len(tests)


def load_failed(values: list) -> bool:
    """True when every test errored the same way before running (the solution did not load or run)."""
    errs = [v.get("error") for v in values if isinstance(v, dict)]
    return len(errs) == len(values) and len(set(errs)) == 1 and not str(errs[0]).startswith("AssertionError")
