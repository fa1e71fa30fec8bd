"""Instruction-following verifiers as a judge (AutoIF): cross-validation and pass rates in the sandbox.

Input: Python sources defining ``evaluate(response) -> bool`` and test cases
``[{"input": str, "output": bool}]``. Output: which functions and cases survive cross-validation
(``cross_validate``), the pass rate of responses under kept verifiers (``pass_rates``,
``evaluate_response``), and the verifier file reader (``load_verifiers``). Every function runs in
``reward.sandbox``; a function that names the network is dropped before it runs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.core.config import key

# Model-written verifiers must not reach the network (AutoIF dropped lines mentioning
# requests/download); the sandbox has no network anyway, this makes the drop explicit.
NETWORK_RE = re.compile(r"\b(?:socket|urllib\d?|requests|httpx|aiohttp|http\.client|ftplib|smtplib|telnetlib|"
                        r"xmlrpc|urlopen|websocket|paramiko)\b|\bdownload")


@dataclass
class CrossValConfig:
    """Thresholds of verifier cross-validation (defaults: AutoIF code/3_cross_validation.py)."""

    min_candidate_functions: int = key(3, "skip an instruction with fewer distinct usable functions (AutoIF: 3)")
    min_candidate_cases: int = key(10, "skip an instruction with fewer distinct test cases (AutoIF: 10)")
    function_accuracy: float = key(0.8, "keep a function with accuracy >= this on the kept cases (AutoIF: 0.8)")
    min_functions: int = key(1, "keep an instruction with at least this many kept functions (AutoIF: 1)")
    min_cases: int = key(1, "... and at least this many kept cases")
    timeout_s: float = key(5.0, "sandbox wall-clock limit per function process (AutoIF: 5 s alarm per call)")
    memory_mb: int = key(512, "sandbox memory of one function's run (all its processes together)")
    workers: int | None = key(None, "parallel sandbox processes (default: CPU count)")

    def check(self) -> None:
        """Range checks."""
        if not 0.0 <= self.function_accuracy <= 1.0:
            raise ValueError(f"function_accuracy must be in [0, 1], got {self.function_accuracy}")


def parse_cases(raw: Any) -> list[dict] | None:
    """Validate test cases ``[{"input": str, "output": bool}]``; None when ``raw`` is not a list of them."""
    if not isinstance(raw, list):
        return None
    out = []
    for c in raw:
        if not (isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), bool)):
            return None
        out.append({"input": c["input"], "output": c["output"]})
    return out


def uses_network(source: str) -> bool:
    """True when a verifier source names a network module or downloads something."""
    return bool(NETWORK_RE.search(source))


@dataclass
class CrossValResult:
    """Outcome of ``cross_validate`` for one instruction."""

    kept: bool
    functions: list[str]  # kept function sources
    cases: list[dict]  # kept test cases
    accuracy: dict[int, float]  # candidate function index -> accuracy on kept cases (functions that ran)
    dropped: dict[str, int]  # reason -> number of candidate functions dropped before scoring
    reason: str  # "ok" or why the instruction is dropped


def _dedupe(items: list, key) -> list:
    seen, out = set(), []
    for x in items:
        k = key(x)
        if k not in seen:
            seen.add(k)
            out.append(x)
    return out


def cross_validate(functions: list[str], cases: list[dict], pool: Any, cfg: CrossValConfig) -> CrossValResult:
    """Cross-validate verifier functions and test cases in the sandbox (AutoIF step 3).

    ``pool`` is a ``reward.sandbox.SandboxPool`` (anything with its
    ``call_many``). Each function runs in ONE sandboxed run over all cases; its values come back
    as plain data through the sandbox's judge (``reward.sandbox_judge``), so a function cannot
    report anything but what it returned.
    A function is dropped when it names the network, when its process dies
    (timeout, memory, killed) or when every call raises (including failing to
    load). A verdict that is not a bool counts as wrong.
    """
    funcs = _dedupe([f.strip() + "\n" for f in functions], lambda f: f)
    cases = _dedupe(cases, lambda c: (c["input"], c["output"]))
    dropped: Counter = Counter()
    usable = []
    for f in funcs:
        if uses_network(f):
            dropped["network"] += 1
        else:
            usable.append(f)
    if len(usable) < cfg.min_candidate_functions or len(cases) < cfg.min_candidate_cases or not cases:
        return CrossValResult(False, [], [], {}, dict(dropped), "too_few_candidates")
    results = pool.call_many([(f, "evaluate", [c["input"] for c in cases]) for f in usable])
    verdicts: dict[int, list[bool | None]] = {}
    for i, (res, vals) in enumerate(results):
        if res.status != "ok":
            dropped[res.status] += 1
        elif all(isinstance(v, dict) and "error" in v for v in vals):
            dropped["raises"] += 1
        else:
            verdicts[i] = [v if isinstance(v, bool) else None for v in vals]
    kept_idx = [j for j, c in enumerate(cases) if any(v[j] is c["output"] for v in verdicts.values())]
    kept_cases = [cases[j] for j in kept_idx]
    acc = {i: (sum(v[j] is cases[j]["output"] for j in kept_idx) / len(kept_idx) if kept_idx else 0.0)
           for i, v in verdicts.items()}
    kept_funcs = [usable[i] for i, a in acc.items() if kept_idx and a >= cfg.function_accuracy]
    if len(kept_funcs) < cfg.min_functions:
        return CrossValResult(False, kept_funcs, kept_cases, acc, dict(dropped), "too_few_functions")
    if len(kept_cases) < cfg.min_cases:
        return CrossValResult(False, kept_funcs, kept_cases, acc, dict(dropped), "too_few_cases")
    return CrossValResult(True, kept_funcs, kept_cases, acc, dict(dropped), "ok")


def pass_rates(verifier_sources: list[str], responses: list[str], pool: Any) -> list[float]:
    """Pass rate of each response: the fraction of verifiers returning True (errors count as False)."""
    if not verifier_sources or not responses:
        return [0.0] * len(responses)
    results = pool.call_many([(src, "evaluate", list(responses)) for src in verifier_sources])
    return [sum(vals[j] is True for _, vals in results) / len(verifier_sources) for j in range(len(responses))]


def evaluate_response(verifier_sources: list[str], response: str, pool: Any = None) -> float:
    """Pass rate of one response under the verifiers of one instruction (for ``posttrain eval``).

    Runs every function in the sandbox; ``pool`` defaults to a fresh ``SandboxPool``.
    """
    from reward.sandbox import SandboxPool

    if pool is not None:
        return pass_rates(verifier_sources, [response], pool)[0]
    with SandboxPool() as p:
        return pass_rates(verifier_sources, [response], p)[0]


def load_verifiers(path: str | Path) -> list[dict]:
    """Read ``verifiers.jsonl`` written by this stage: ``{id, instruction, category, functions, cases, ...}``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
