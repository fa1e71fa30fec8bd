"""Stage ``if_feedback``: instruction following with execution feedback (AutoIF, Dong et al. 2024).

Input: a seed file of verifiable constraints (JSONL: ``id``, ``instruction``,
optional ``category``, ``functions`` (Python sources defining
``evaluate(response) -> bool``) and ``cases`` (``[{"input": str, "output": bool}]``)),
and user queries (prompt records; ``eval_queries``: optional held-out ones). Steps:

1. ``augment``: the model proposes new constraint instructions from seed examples (JSON list).
2. ``verifiers``: for every instruction the model writes ``functions_per_instruction``
   replies ``{"func": "def evaluate(response): ...", "cases": [...]}``.
3. ``crossval`` (sandbox): ``cross_validate`` drops functions that use the network
   (static check) or fail to load/run; keeps a case when at least one function
   gets it right; keeps a function whose accuracy on the kept cases reaches the
   threshold; keeps an instruction with enough functions and cases.
4. ``back_translation`` + ``consistency`` (optional): the model turns each of the first
   ``back_translate_functions`` kept functions of an instruction back into an instruction
   and judges whether it is consistent with the original (``{"consistent": true|false}``).
   An instruction is kept only when every checked function is judged consistent: one
   ``false`` drops it (AutoIF drops an instruction when any of its first 3 back-translations
   is an NLI contradiction), and so does one unparseable verdict (counted as ``unparsed``).
5. ``responses``: each kept instruction is appended to ``queries_per_instruction``
   user queries; ``responses_per_prompt`` responses are sampled per prompt.
6. ``scores`` (sandbox): a response's pass rate is the mean of the kept verifiers' verdicts.
7. ``quality`` (``quality_filter``): the model rates each candidate demonstration / chosen
   response (distinct, whole, pass rate >= the lower of ``demo_min_pass_rate`` and
   ``chosen_min_pass_rate``) for how well it answers the query under the constraint, 1..10,
   on a last line ``Score: N``; a response rated below ``quality_min_score``, or whose rating
   does not parse (counted as ``unparsed``), is neither a demonstration nor a chosen response.

Resumable (``data_synthesis.common``): each step is cached per item in ``OUT/steps/STEP.jsonl``;
model calls go to the sampler ``chunk_size`` items at a time (seeded per item) and sandbox runs
``chunk_size`` items side by side, each chunk committed as soon as it returns, so a kill loses
at most one chunk and a re-run does only what is missing. Fewer than ``min_success_rate``
usable verifier replies (a function or cases), parseable consistency verdicts, non-empty
responses or parseable quality ratings stop the stage before it writes anything.

Output, derived from the caches and written whole once every step has finished:
``OUT/demonstrations.jsonl`` (pass rate >= ``demo_min_pass_rate`` and, with ``quality_filter``,
rated >= ``quality_min_score``), ``OUT/preferences.jsonl`` (chosen: pass rate >=
``chosen_min_pass_rate`` and rated as a demonstration must be; rejected: pass rate <=
``rejected_max_pass_rate``; same prompt; up to ``max_pairs_per_prompt`` distinct pairs, the
best chosen and lowest rejected responses combined first), ``OUT/verifiers.jsonl`` (kept
instructions with their functions and cases: an instruction-following
evaluator, see ``evaluate_response``), ``OUT/eval_prompts.jsonl`` (when
``eval_queries`` is set: held-out prompts with ``meta.verifiers``, the input
``posttrain eval`` scores), ``stats.json`` (per step). The stage summary also carries
``back_translation_unparsed`` and ``quality_unparsed``: the verdicts that did not parse.

Defaults of the filters come from AutoIF's public code (QwenLM/AutoIF,
``code/3_cross_validation.py`` and ``code_dpo/2_dpo_data_query_construct.py``):
instructions with fewer than 3 compiled functions or 10 distinct cases are
skipped; a function is kept at accuracy >= 0.8 on the kept cases; an instruction
needs at least one kept function; DPO pairs take chosen responses with pass
rate >= 0.5 and rejected ones with pass rate 0; each call had a 5 s time limit.
Also AutoIF's: back-translating the first 3 kept functions (``4_eval_func_backtranslator.py``,
``5_eval_func_backtranslator_filter.py``); 16 queries per instruction
(``6_concat_sharegpt_query.py``); up to 4 DPO pairs per prompt (2 chosen x 2 rejected); the
quality score of 8 of 10 (the paper keeps responses scored >= 8; ``8_query_score_filiter.py``
keeps a mean score > 8; AutoIF scores 0..10, ours asks for 1..10).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, check_success, extract_json, lazy_sampler,
                                   map_step, norm_text, sample_step, step_path, unique_ids)
from posttrain.core.config import key
from posttrain.core.datafiles import iter_jsonl
from posttrain.core.inputs import InputSpec
from posttrain.core.records import demonstration, preference, record_id, to_chat_prompt, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams
from reward.if_verifiers import CrossValConfig, cross_validate, parse_cases, pass_rates


@dataclass
class IFFeedbackConfig:
    """Keys of stage ``if_feedback``."""

    seeds: str = key(doc="seed constraints JSONL (id, instruction, category?, functions?, cases?)", input=True)
    queries: InputSpec = key(doc="user queries: prompt records (JSONL/Parquet/datasets)", input=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.8, max_tokens=512, seed=0))
    judge_sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=128, seed=0))
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    # 1. augmentation
    augment_prompts: int = key(4, "prompts asking for new constraints (0: seeds only)")
    new_per_prompt: int = key(5, "constraints asked for per prompt")
    examples_per_prompt: int = key(5, "seed constraints shown per prompt")
    max_new_instructions: int | None = key(None, "cap on accepted new constraints")
    # 2-3. verifiers and cross-validation
    functions_per_instruction: int = key(4, "verifier replies sampled per instruction (AutoIF's K)")
    cross_validation: CrossValConfig = field(default_factory=CrossValConfig)
    # 4. back-translation
    back_translate: bool = key(True, "drop instructions whose kept functions back-translate to something not judged "
                                     "consistent with them (an unparseable verdict counts as not consistent)")
    back_translate_functions: int = key(3, "kept functions back-translated per instruction (AutoIF: 3); the "
                                           "instruction is kept only when every one is judged consistent")
    # 5-7. responses, pass rates, quality
    queries_per_instruction: int = key(16, "user queries each kept instruction is attached to (16: AutoIF's value)")
    responses_per_prompt: int = key(4, "responses sampled per (query, instruction)")
    demo_min_pass_rate: float = key(1.0, "demonstrations: pass rate >= this (all verifiers agree)")
    chosen_min_pass_rate: float = key(0.5, "preference chosen: pass rate >= this (AutoIF DPO: 0.5)")
    rejected_max_pass_rate: float = key(0.0, "preference rejected: pass rate <= this (AutoIF DPO: 0)")
    max_pairs_per_prompt: int = key(4, "distinct preference pairs per prompt (4: AutoIF's value, 2 chosen x 2 rejected)")
    quality_filter: bool = key(True, "the model rates each candidate demonstration / chosen response 1..10 (AutoIF's "
                                     "quality score); low or unparseable ratings are dropped")
    quality_min_score: float = key(8, "quality_filter: keep responses rated >= this (AutoIF: 8 of 10)")
    require_stop: bool = key(True, "demonstrations / chosen responses must not be cut by max_tokens")
    limit_queries: int | None = key(None, "use only the first N queries")
    eval_queries: InputSpec | None = key(None, "held-out queries: write eval_prompts.jsonl for `posttrain eval`", input=True)
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, CHUNK_DOC + "; also the items whose sandbox runs go to the pool together")
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: a verifier reply with a function or test cases; a "
                                        "parseable consistency verdict; a non-empty response; a parseable quality rating)")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field checks; a key that would have no effect is an error."""
        for k, switch in (("quality_min_score", "quality_filter"), ("back_translate_functions", "back_translate")):
            if k in given and not getattr(self, switch):
                raise ValueError(f"{k} has no effect with {switch}: false (remove it)")
        if self.chosen_min_pass_rate <= self.rejected_max_pass_rate:
            raise ValueError("chosen_min_pass_rate must be greater than rejected_max_pass_rate")
        if min(self.functions_per_instruction, self.responses_per_prompt, self.queries_per_instruction) < 1:
            raise ValueError("functions_per_instruction, responses_per_prompt and queries_per_instruction must be >= 1")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.back_translate_functions < 1:
            raise ValueError("back_translate_functions must be >= 1")
        if self.max_pairs_per_prompt < 0:
            raise ValueError("max_pairs_per_prompt must be >= 0")
        if not 1 <= self.quality_min_score <= 10:
            raise ValueError("quality_min_score must be in [1, 10]")
        if not 0 <= self.min_success_rate <= 1:
            raise ValueError("min_success_rate must be in [0, 1]")


# ---------------------------------------------------------------- pure parts

def load_seeds(path: str | Path) -> list[dict]:
    """Read seed constraints; errors are one line naming the file, line and key."""
    p = Path(path)
    out, seen = [], set()
    for where, d in iter_jsonl(p):
        n = where.rsplit(":", 1)[1]
        if not isinstance(d, dict) or not isinstance(d.get("instruction"), str) or not d["instruction"].strip():
            raise ValueError(f"{p}:{n}: 'instruction' must be a non-empty string")
        funcs = d.get("functions", [])
        if not isinstance(funcs, list) or not all(isinstance(f, str) for f in funcs):
            raise ValueError(f"{p}:{n}: 'functions' must be a list of Python sources")
        cases = parse_cases(d.get("cases", []))
        if cases is None:
            raise ValueError(f"{p}:{n}: 'cases' must be a list of {{\"input\": str, \"output\": bool}}")
        sid = str(d.get("id") or record_id("ifc", norm_text(d["instruction"])))
        if sid in seen:
            raise ValueError(f"{p}:{n}: duplicate id {sid!r}")
        seen.add(sid)
        out.append({"id": sid, "instruction": d["instruction"].strip(), "category": str(d.get("category", "")),
                    "functions": funcs, "cases": cases, "origin": "seed"})
    if not out:
        raise ValueError(f"{p}: no seed constraints")
    return out


def parse_verifier_reply(text: str) -> tuple[str | None, list[dict]]:
    """``(function source or None, valid cases)`` from a verifier reply; malformed parts give None / []."""
    d = extract_json(text)
    if not isinstance(d, dict):
        return None, []
    func = d.get("func", d.get("function"))
    func = func if isinstance(func, str) and "def evaluate" in func else None
    raw = d.get("cases")
    cases = []
    for c in raw if isinstance(raw, list) else []:
        ok = parse_cases([c])  # keep the well-formed cases of a partly malformed list
        if ok:
            cases.extend(ok)
    return func, cases


def augment_prompt(examples: list[str], k: int) -> list[dict]:
    """Ask for ``k`` new verifiable constraints in the style of ``examples``."""
    ex = "\n".join(f"- {e}" for e in examples)
    return [{"role": "user", "content": (
        "Here are instructions that constrain the form of a response in ways a Python program can check "
        f"(length, format, keywords, casing, structure):\n{ex}\n\nWrite {k} new, different instructions of this "
        "kind. Each must be checkable by code alone, without judging meaning. Reply with a JSON list of strings only.")}]


def verifier_prompt(instruction: str) -> list[dict]:
    """Ask for one verification function and test cases as JSON."""
    return [{"role": "user", "content": (
        f"Instruction: {instruction}\n\nWrite a Python function `evaluate(response)` that returns True when the "
        "string `response` follows the instruction and False otherwise. Use only the standard library. Then write "
        "at least 5 test cases: responses that follow it (output true) and responses that break it (output false). "
        'Reply with JSON only: {"func": "def evaluate(response): ...", "cases": [{"input": "...", "output": true}]}')}]


def back_translation_prompt(source: str) -> list[dict]:
    """Ask which instruction a verification function checks."""
    return [{"role": "user", "content": (
        f"This Python function checks whether a response follows an instruction:\n\n{source}\n"
        "Write that instruction as one sentence addressed to the writer of the response. Reply with the instruction only.")}]


def consistency_prompt(original: str, back: str) -> list[dict]:
    """Ask whether a back-translated instruction is consistent with the original (JSON verdict)."""
    return [{"role": "user", "content": (
        f"Instruction A: {original}\nInstruction B: {back}\n\nDo A and B ask for the same thing (B may be less "
        'detailed), or do they contradict each other? Reply with JSON only: {"consistent": true} or {"consistent": false}')}]


def parse_consistency(text: str) -> bool | None:
    """The verdict of a consistency reply (``{"consistent": true|false}``); None when it does not parse."""
    return extract_json(text, lambda o: o["consistent"] if isinstance(o, dict) and isinstance(o.get("consistent"), bool)
                        else None)


def quality_prompt(instruction: str, query: str, response: str) -> list[dict]:
    """Ask for a 1..10 quality rating of a response to a query under a constraint (AutoIF's scoring prompt)."""
    return [{"role": "user", "content": (
        "You are an expert at judging whether a response follows an instruction and answers a query.\n"
        f"[Instruction] {instruction}\n[Query] {query}\n[Response] {response}\n"
        "The response must strictly follow the Instruction, so it may be less helpful than usual; judge whether it "
        "answers the Query. Give a short analysis (at most two sentences), then on the last line a score from 1 to 10 "
        "(1: unrelated to the query, 10: helpful and highly related) in the format `Score: N`, nothing after it.")}]


_SCORE = re.compile(r"score\W{0,4}(\d+(?:\.\d+)?)", re.I)


def parse_quality_score(text: str) -> float | None:
    """The last ``Score: N`` of a rating reply, when N is in 1..10; None otherwise (counted as unparsed)."""
    found = _SCORE.findall(text or "")
    score = float(found[-1]) if found else None
    return score if score is not None and 1 <= score <= 10 else None


def attach(prompt: list[dict], instruction: str) -> list[dict]:
    """The query prompt with the constraint appended to its last user turn (AutoIF's concatenation)."""
    msgs = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last]["content"] = f"{msgs[last]['content'].rstrip()}\n\n{instruction}"
    return msgs


# ---------------------------------------------------------------- stage

def _each(fn: Callable[[str], Any], keys: list[str], workers: int) -> list[Any]:
    """``[fn(k) for k in keys]``, run side by side in threads (each ``fn`` waits on the sandbox pool)."""
    if len(keys) <= 1 or workers <= 1:
        return [fn(k) for k in keys]
    with ThreadPoolExecutor(max_workers=min(len(keys), workers), thread_name_prefix="if-feedback") as ex:
        return list(ex.map(fn, keys))


def _augment(cfg: IFFeedbackConfig, ctx, get_sampler, seeds: list[dict], stats: dict) -> dict[str, dict]:
    """Step 1: the seeds plus the new constraints the model proposes (``id -> instruction item``)."""
    instructions = {s["id"]: s for s in seeds}
    seen_text = {norm_text(s["instruction"]) for s in seeds}
    jobs = {}
    for i in range(cfg.augment_prompts):
        r = random.Random(f"{ctx.seed}-augment-{i}")
        ex = [s["instruction"] for s in r.sample(seeds, min(cfg.examples_per_prompt, len(seeds)))]
        jobs[f"augment-{i}"] = augment_prompt(ex, cfg.new_per_prompt)
    aug = sample_step(ctx, get_sampler, "augment", jobs, dataclasses.replace(cfg.sampling, n=1), cfg.chunk_size) if jobs else {}
    st = Counter(prompts=len(jobs), malformed=0, proposed=0, duplicates=0, new=0)
    for k in jobs:
        data = extract_json(aug[k][0]["text"])
        if isinstance(data, dict):
            data = data.get("instructions")
        if not isinstance(data, list):
            st["malformed"] += 1
            continue
        for t in data:
            if not isinstance(t, str) or not t.strip():
                continue
            st["proposed"] += 1
            if norm_text(t) in seen_text:
                st["duplicates"] += 1
            elif cfg.max_new_instructions is None or st["new"] < cfg.max_new_instructions:
                seen_text.add(norm_text(t))
                iid = record_id("ifc", norm_text(t))
                instructions[iid] = {"id": iid, "instruction": t.strip(), "category": "generated",
                                     "functions": [], "cases": [], "origin": "model"}
                st["new"] += 1
    stats["augment"] = dict(st)
    return instructions


def _verifiers(cfg: IFFeedbackConfig, ctx, get_sampler, instructions: dict[str, dict],
               stats: dict) -> dict[str, tuple[list[str], list[dict]]]:
    """Step 2: candidate ``(functions, cases)`` per instruction: the seed's own plus the parsed replies."""
    ver = sample_step(ctx, get_sampler, "verifiers", {i: verifier_prompt(d["instruction"]) for i, d in instructions.items()},
                      dataclasses.replace(cfg.sampling, n=cfg.functions_per_instruction), cfg.chunk_size)
    st = Counter(instructions=len(instructions), replies=0, malformed=0, functions_parsed=0, cases_parsed=0)
    candidates: dict[str, tuple[list[str], list[dict]]] = {}
    for iid, d in instructions.items():
        funcs, cases = list(d["functions"]), list(d["cases"])
        for comp in ver[iid]:
            st["replies"] += 1
            f, cs = parse_verifier_reply(comp["text"])
            if f is None and not cs:
                st["malformed"] += 1
            if f is not None:
                funcs.append(f)
                st["functions_parsed"] += 1
            cases.extend(cs)
            st["cases_parsed"] += len(cs)
        candidates[iid] = (funcs, cases)
    stats["verifiers"] = dict(st)
    check_success(ctx.spec.name, "verifier replies with a function or test cases", st["replies"] - st["malformed"],
                  st["replies"], cfg.min_success_rate, [step_path(ctx, "verifiers")])
    return candidates


def _cross_validation_stats(cfg: IFFeedbackConfig, cv: dict[str, dict]) -> dict:
    """Counts of step 3: instructions kept or dropped (by reason), functions and cases kept."""
    st = Counter(instructions=len(cv), kept=0, functions_kept=0, cases_kept=0, functions_below_accuracy=0)
    for r in cv.values():
        st[f"dropped_{r['reason']}" if not r["kept"] else "kept"] += 1
        st["functions_kept"] += len(r["functions"]) if r["kept"] else 0
        st["cases_kept"] += len(r["cases"]) if r["kept"] else 0
        for why, c in r["dropped"].items():
            st[f"functions_dropped_{why}"] += c
        st["functions_below_accuracy"] += sum(a < cfg.cross_validation.function_accuracy for a in r["accuracy"].values())
    return dict(st)


def _back_translate(cfg: IFFeedbackConfig, ctx, get_sampler, instructions: dict[str, dict], cv: dict[str, dict],
                    kept: list[str], stats: dict) -> list[str]:
    """Step 4: the kept instructions whose first ``back_translate_functions`` kept functions all back-translate to an
    instruction judged consistent with the original (one ``false`` or unparseable verdict drops the instruction)."""
    checks = {f"{i}#{j}": (i, f) for i in kept for j, f in enumerate(cv[i]["functions"][: cfg.back_translate_functions])}
    bt = sample_step(ctx, get_sampler, "back_translation", {k: back_translation_prompt(f) for k, (_, f) in checks.items()},
                     dataclasses.replace(cfg.sampling, n=1), cfg.chunk_size)
    jud = sample_step(ctx, get_sampler, "consistency",
                      {k: consistency_prompt(instructions[i]["instruction"], bt[k][0]["text"].strip())
                       for k, (i, _) in checks.items()}, dataclasses.replace(cfg.judge_sampling, n=1), cfg.chunk_size)
    verdicts: dict[str, list[bool | None]] = {i: [] for i in kept}
    for k, (i, _) in checks.items():
        verdicts[i].append(parse_consistency(jud[k][0]["text"]))
    flat = [v for vs in verdicts.values() for v in vs]
    st = Counter(instructions=len(kept), functions_checked=len(flat), consistent=flat.count(True),
                 inconsistent=flat.count(False), unparsed=flat.count(None), kept=0, dropped_inconsistent=0,
                 dropped_unparsed=0)
    still = []
    for i in kept:
        if False in verdicts[i]:
            st["dropped_inconsistent"] += 1
        elif None in verdicts[i]:
            st["dropped_unparsed"] += 1
        else:
            st["kept"] += 1
            still.append(i)
    stats["back_translation"] = dict(st)
    check_success(ctx.spec.name, "parseable consistency verdicts", len(flat) - st["unparsed"], len(flat),
                  cfg.min_success_rate, [step_path(ctx, "consistency")])
    return still


def run(cfg: IFFeedbackConfig, ctx) -> dict:
    """Entry point of stage kind ``if_feedback`` (steps and outputs: module docstring)."""
    seeds = load_seeds(ctx.resolve(cfg.seeds))
    qrows = ctx.read_input(cfg.queries, None, cfg.limit_queries)
    if not qrows:
        raise ValueError(f"{cfg.queries}: no queries")
    eval_rows = ctx.read_input(cfg.eval_queries, None) if cfg.eval_queries else None
    get_sampler = lazy_sampler(ctx, cfg.sampler, cfg.model)
    xv = cfg.cross_validation
    pool_box: list = []

    def pool():  # started on first use: a fully cached run starts no sandbox
        from reward.sandbox import SandboxLimits, SandboxPool

        if not pool_box:
            pool_box.append(SandboxPool(xv.workers, SandboxLimits(timeout_s=xv.timeout_s, memory_mb=xv.memory_mb)))
        return pool_box[0]

    stats: dict[str, dict] = {}
    try:
        instructions = _augment(cfg, ctx, get_sampler, seeds, stats)
        candidates = _verifiers(cfg, ctx, get_sampler, instructions, stats)
        # 3. cross-validation in the sandbox, chunk_size instructions side by side
        cv = map_step(ctx, "crossval", list(instructions), lambda chunk: _each(
            lambda iid: dataclasses.asdict(cross_validate(*candidates[iid], pool(), xv)), chunk, pool().workers),
            cfg.chunk_size)
        stats["cross_validation"] = _cross_validation_stats(cfg, cv)
        kept = [i for i in instructions if cv[i]["kept"]]
        if cfg.back_translate and kept:
            kept = _back_translate(cfg, ctx, get_sampler, instructions, cv, kept, stats)
        # 5. responses
        prompts, pmeta = {}, {}
        for i in kept:
            r = random.Random(f"{ctx.seed}-queries-{i}")
            for q in r.sample(qrows, min(cfg.queries_per_instruction, len(qrows))):
                k = record_id("ifp", i, q["id"])
                qp = to_chat_prompt(q)
                prompts[k] = attach(qp, instructions[i]["instruction"])
                pmeta[k] = (i, str(q["id"]), [m["content"] for m in qp if m["role"] == "user"][-1])
        outs = sample_step(ctx, get_sampler, "responses", prompts,
                           dataclasses.replace(cfg.sampling, n=cfg.responses_per_prompt), cfg.chunk_size) if prompts else {}
        comps = [c for v in outs.values() for c in v]
        check_success(ctx.spec.name, "non-empty responses", sum(bool(c["text"].strip()) for c in comps), len(comps),
                      cfg.min_success_rate, [step_path(ctx, "responses")])
        # 6. scores in the sandbox
        scores = map_step(ctx, "scores", list(prompts), lambda chunk: _each(lambda k: pass_rates(
            cv[pmeta[k][0]]["functions"], [c["text"] for c in outs[k]], pool()), chunk, pool().workers),
            cfg.chunk_size) if prompts else {}
    finally:
        if pool_box:
            pool_box[0].close()
    # 7. quality ratings of the candidate demonstrations / chosen responses
    quality = _quality(cfg, ctx, get_sampler, prompts, pmeta, outs, scores, instructions, stats) if cfg.quality_filter else None
    # every step is done: derive the records from the caches and write them whole
    demos, prefs, stats["responses"] = _records(cfg, prompts, pmeta, outs, scores, instructions, quality)
    verifiers = [{**{k: instructions[i][k] for k in ("id", "instruction", "category", "origin")},
                  "functions": cv[i]["functions"], "cases": cv[i]["cases"]} for i in kept]
    write_records(ctx.out_dir / "demonstrations.jsonl", demos, "demonstration")
    write_records(ctx.out_dir / "preferences.jsonl", prefs, "preference")
    _write_jsonl(ctx.out_dir / "verifiers.jsonl", verifiers)
    if eval_rows is not None:
        write_records(ctx.out_dir / "eval_prompts.jsonl", _eval_prompts(eval_rows, [
            instructions[i] | {"functions": cv[i]["functions"]} for i in kept]), "prompt")
    ctx.write_json("stats.json", stats)
    return {"instructions": len(instructions), "kept_instructions": len(kept), **stats["responses"],
            "back_translation_unparsed": stats.get("back_translation", {}).get("unparsed", 0),
            "quality_unparsed": stats.get("quality", {}).get("unparsed", 0)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write plain JSON rows atomically (verifiers are not canonical records, so not ``write_records``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _eval_prompts(queries: list[dict], kept: list[dict]) -> list[dict]:
    """Every held-out query with every kept constraint; ``meta.verifiers`` is what
    ``posttrain.evaluation.evaluate`` reads to compute an instruction-following pass rate."""
    return unique_ids({"id": record_id("if-eval", v["id"], q["id"]), "prompt": attach(to_chat_prompt(q), v["instruction"]),
                       "source": "if_feedback", "meta": {"verifiers": v["functions"], "instruction_id": v["id"],
                                                         "constraint": v["instruction"], "query_id": str(q["id"])}}
                      for v in kept for q in queries)


def _distinct(cfg: IFFeedbackConfig, comps: list[dict], rates: list[float]) -> list[tuple[str, float, bool]]:
    """``(text, pass rate, whole)`` of a prompt's distinct non-empty responses, in sampling order."""
    seen, out = set(), []
    for comp, rate in zip(comps, rates):
        text = comp["text"].strip()
        if text and text not in seen:
            seen.add(text)
            out.append((text, rate, comp["finish"] == "stop" or not cfg.require_stop))
    return out


def _quality_key(prompt_key: str, text: str) -> str:
    """The ``quality`` step's cache key of one distinct response of a prompt."""
    return record_id("ifq", prompt_key, text)


def _quality(cfg: IFFeedbackConfig, ctx, get_sampler, prompts, pmeta, outs, scores, instructions,
             stats: dict) -> dict[str, float | None]:
    """Step 7: the 1..10 rating (None: unparseable) of every candidate demonstration / chosen response."""
    floor = min(cfg.demo_min_pass_rate, cfg.chosen_min_pass_rate)
    jobs = {_quality_key(k, text): quality_prompt(instructions[pmeta[k][0]]["instruction"], pmeta[k][2], text)
            for k in prompts for text, rate, whole in _distinct(cfg, outs[k], scores[k]) if whole and rate >= floor}
    got = sample_step(ctx, get_sampler, "quality", jobs, dataclasses.replace(cfg.judge_sampling, n=1),
                      cfg.chunk_size) if jobs else {}
    rated = {q: parse_quality_score(got[q][0]["text"]) for q in jobs}
    vals = list(rated.values())
    unparsed = vals.count(None)
    passed = sum(v is not None and v >= cfg.quality_min_score for v in vals)
    stats["quality"] = {"rated": len(vals), "passed": passed, "below_min": len(vals) - passed - unparsed,
                        "unparsed": unparsed}
    check_success(ctx.spec.name, "parseable quality ratings", len(vals) - unparsed, len(vals), cfg.min_success_rate,
                  [step_path(ctx, "quality")])
    return rated


def _records(cfg: IFFeedbackConfig, prompts, pmeta, outs, scores, instructions,
             quality: dict[str, float | None] | None) -> tuple[list[dict], list[dict], dict]:
    """Demonstrations and preferences from the cached responses, pass rates and quality ratings (``quality``: None
    when ``quality_filter`` is off), with the step's stats.

    Pairs: the chosen responses (highest pass rate first) and the rejected ones (lowest first) are combined in the
    order (0, 0), (0, 1), (1, 0), (1, 1), (0, 2), ... (the ``i``-th best of each side before the ``i+1``-th), the
    first ``max_pairs_per_prompt`` kept: 4 gives AutoIF's 2 chosen x 2 rejected when a prompt has them.
    """
    hist: Counter = Counter()
    total = 0
    demos: list[dict] = []
    prefs: list[dict] = []
    for k, p in prompts.items():
        iid, qid, _ = pmeta[k]
        meta = {"instruction_id": iid, "constraint": instructions[iid]["instruction"], "query_id": qid}
        for rate in scores[k]:
            total += 1
            hist[f"{rate:.2f}"] += 1
        chosen, rejected = [], []
        for text, rate, whole in _distinct(cfg, outs[k], scores[k]):
            q = quality.get(_quality_key(k, text)) if quality is not None else None
            good = whole and (quality is None or (q is not None and q >= cfg.quality_min_score))
            extra = {"quality_score": q} if quality is not None else {}
            if rate >= cfg.demo_min_pass_rate and good:
                demos.append(demonstration(p + [{"role": "assistant", "content": text}], source="if_feedback",
                                           id=record_id("if-demo", k, text), meta={**meta, "pass_rate": rate, **extra}))
            if rate >= cfg.chosen_min_pass_rate:
                if good:
                    chosen.append((rate, text, extra))
            elif rate <= cfg.rejected_max_pass_rate:
                rejected.append((rate, text))
        chosen.sort(key=lambda x: -x[0])
        rejected.sort(key=lambda x: x[0])
        order = sorted(itertools.product(range(len(chosen)), range(len(rejected))), key=lambda ij: (max(ij), ij))
        for ci, ri in order[: cfg.max_pairs_per_prompt]:
            (cr, ct, extra), (rr, rt) = chosen[ci], rejected[ri]
            prefs.append(preference(p, ct, rt, source="if_feedback", id=record_id("if-pref", k, ct, rt),
                                    meta={**meta, "chosen_pass_rate": cr, "rejected_pass_rate": rr, **extra}))
    demos, prefs = unique_ids(demos), unique_ids(prefs)
    return demos, prefs, {"prompts": len(prompts), "responses": total, "pass_rate_histogram": dict(sorted(hist.items())),
                          "demonstrations": len(demos), "preferences": len(prefs)}
