"""Stage ``if_feedback``: instruction following with execution feedback (AutoIF, Dong et al. 2024).

Input: a seed file of verifiable constraints (JSONL: ``id``, ``instruction``,
optional ``category``, ``functions`` (Python sources defining
``evaluate(response) -> bool``) and ``cases`` (``[{"input": str, "output": bool}]``)),
and user queries (prompt records). Steps, each cached for resuming:

1. ``augment``: the model proposes new constraint instructions from seed examples (JSON list).
2. ``verifiers``: for every instruction the model writes ``functions_per_instruction``
   replies ``{"func": "def evaluate(response): ...", "cases": [...]}``.
3. ``crossval`` (sandbox): ``cross_validate`` drops functions that use the network
   (static check) or fail to load/run; keeps a case when at least one function
   gets it right; keeps a function whose accuracy on the kept cases reaches the
   threshold; keeps an instruction with enough functions and cases.
4. ``back_translation`` (optional): the model turns a kept function back into an
   instruction and judges whether it is consistent with the original; an
   instruction judged inconsistent is dropped (as AutoIF drops NLI contradictions).
5. ``responses``: each kept instruction is appended to ``queries_per_instruction``
   user queries; ``responses_per_prompt`` responses are sampled per prompt.
6. ``scores`` (sandbox): a response's pass rate is the mean of the kept verifiers' verdicts.

Output: ``OUT/demonstrations.jsonl`` (pass rate >= ``demo_min_pass_rate``),
``OUT/preferences.jsonl`` (pass rate >= ``chosen_min_pass_rate`` vs <=
``rejected_max_pass_rate``, same prompt), ``OUT/verifiers.jsonl`` (kept
instructions with their functions and cases: an instruction-following
evaluator, see ``evaluate_response``), ``OUT/eval_prompts.jsonl`` (when
``eval_queries`` is set: held-out prompts with ``meta.verifiers``, the input
``posttrain eval`` scores), ``stats.json`` (per step), ``steps/*.jsonl``.

Defaults of the filters come from AutoIF's public code (QwenLM/AutoIF,
``code/3_cross_validation.py`` and ``code_dpo/2_dpo_data_query_construct.py``):
instructions with fewer than 3 compiled functions or 10 distinct cases are
skipped; a function is kept at accuracy >= 0.8 on the kept cases; an instruction
needs at least one kept function; DPO pairs take chosen responses with pass
rate >= 0.5 and rejected ones with pass rate 0; each call had a 5 s time limit.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_synthesis.common import StepCache, extract_json, norm_text, sample_step
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import RecordWriter, demonstration, preference, record_id, to_chat_prompt
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
    back_translate: bool = key(True, "drop instructions whose function back-translates to something inconsistent")
    # 5-6. responses
    queries_per_instruction: int = key(2, "user queries each kept instruction is attached to")
    responses_per_prompt: int = key(4, "responses sampled per (query, instruction)")
    demo_min_pass_rate: float = key(1.0, "demonstrations: pass rate >= this (all verifiers agree)")
    chosen_min_pass_rate: float = key(0.5, "preference chosen: pass rate >= this (AutoIF DPO: 0.5)")
    rejected_max_pass_rate: float = key(0.0, "preference rejected: pass rate <= this (AutoIF DPO: 0)")
    max_pairs_per_prompt: int = key(1, "preference pairs per prompt")
    require_stop: bool = key(True, "demonstrations / chosen responses must not be cut by max_tokens")
    limit_queries: int | None = key(None, "use only the first N queries")
    eval_queries: InputSpec | None = key(None, "held-out queries: write eval_prompts.jsonl for `posttrain eval`", input=True)

    def check(self) -> None:
        """Cross-field checks."""
        if self.chosen_min_pass_rate <= self.rejected_max_pass_rate:
            raise ValueError("chosen_min_pass_rate must be greater than rejected_max_pass_rate")
        if min(self.functions_per_instruction, self.responses_per_prompt, self.queries_per_instruction) < 1:
            raise ValueError("functions_per_instruction, responses_per_prompt and queries_per_instruction must be >= 1")


# ---------------------------------------------------------------- pure parts

def load_seeds(path: str | Path) -> list[dict]:
    """Read seed constraints; errors are one line naming the file, line and key."""
    p = Path(path)
    out, seen = [], set()
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: invalid JSON ({e.msg})") from None
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


def attach(prompt: list[dict], instruction: str) -> list[dict]:
    """The query prompt with the constraint appended to its last user turn (AutoIF's concatenation)."""
    msgs = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last]["content"] = f"{msgs[last]['content'].rstrip()}\n\n{instruction}"
    return msgs


# ---------------------------------------------------------------- stage

def _sandbox_step(ctx, name: str, keys: list[str], fn) -> dict[str, Any]:
    """Run ``fn(key) -> JSON value`` for every key not yet cached in ``steps/NAME.jsonl``, with a progress bar."""
    with StepCache(ctx.out_dir / "steps" / f"{name}.jsonl") as cache:
        todo = [k for k in keys if k not in cache]
        bar = ctx.progress(total=len(keys), desc=f"{ctx.spec.name}:{name}", initial=len(keys) - len(todo))
        for k in todo:
            cache.put(k, fn(k))
            bar.update(1)
        bar.close()
        return {k: cache.get(k) for k in keys}


def run(cfg: IFFeedbackConfig, ctx) -> dict:
    """Entry point of stage kind ``if_feedback``."""
    from reward.sandbox import SandboxLimits, SandboxPool

    seeds = load_seeds(ctx.resolve(cfg.seeds))
    qrows = ctx.read_input(cfg.queries, None, cfg.limit_queries)
    if not qrows:
        raise ValueError(f"{cfg.queries}: no queries")
    rng_seed = ctx.seed
    sampler_cache: list = []

    def get_sampler():
        if not sampler_cache:
            sampler_cache.append(ctx.sampler(cfg.sampler, cfg.model))
        return sampler_cache[0]

    stats: dict[str, dict] = {}
    # 1. augment
    instructions = {s["id"]: s for s in seeds}
    seen_text = {norm_text(s["instruction"]) for s in seeds}
    aug_jobs = {}
    for i in range(cfg.augment_prompts):
        r = random.Random(f"{rng_seed}-augment-{i}")
        ex = [s["instruction"] for s in r.sample(seeds, min(cfg.examples_per_prompt, len(seeds)))]
        aug_jobs[f"augment-{i}"] = augment_prompt(ex, cfg.new_per_prompt)
    aug = sample_step(ctx, get_sampler, "augment", aug_jobs, dataclasses.replace(cfg.sampling, n=1))
    st = Counter(prompts=len(aug_jobs), malformed=0, proposed=0, duplicates=0, new=0)
    for k in aug_jobs:
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
    # 2. verifiers
    ver = sample_step(ctx, get_sampler, "verifiers", {i: verifier_prompt(d["instruction"]) for i, d in instructions.items()},
                      dataclasses.replace(cfg.sampling, n=cfg.functions_per_instruction))
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
    # 3. cross-validation in the sandbox
    limits = SandboxLimits(timeout_s=cfg.cross_validation.timeout_s, memory_mb=cfg.cross_validation.memory_mb)
    with SandboxPool(cfg.cross_validation.workers, limits) as pool:
        cv = _sandbox_step(ctx, "crossval", list(instructions), lambda iid: dataclasses.asdict(
            cross_validate(*candidates[iid], pool, cfg.cross_validation)))
        st = Counter(instructions=len(cv), kept=0, functions_kept=0, cases_kept=0, functions_below_accuracy=0)
        for r in cv.values():
            st[f"dropped_{r['reason']}" if not r["kept"] else "kept"] += 1
            st["functions_kept"] += len(r["functions"]) if r["kept"] else 0
            st["cases_kept"] += len(r["cases"]) if r["kept"] else 0
            for why, c in r["dropped"].items():
                st[f"functions_dropped_{why}"] += c
            st["functions_below_accuracy"] += sum(a < cfg.cross_validation.function_accuracy for a in r["accuracy"].values())
        stats["cross_validation"] = dict(st)
        kept = [i for i in instructions if cv[i]["kept"]]
        # 4. back-translation
        if cfg.back_translate and kept:
            bt = sample_step(ctx, get_sampler, "back_translation", {i: back_translation_prompt(cv[i]["functions"][0]) for i in kept},
                             dataclasses.replace(cfg.sampling, n=1))
            jud = sample_step(ctx, get_sampler, "consistency",
                              {i: consistency_prompt(instructions[i]["instruction"], bt[i][0]["text"].strip()) for i in kept},
                              dataclasses.replace(cfg.judge_sampling, n=1))
            st = Counter(checked=len(kept), consistent=0, inconsistent=0, unjudged_kept=0)
            still = []
            for i in kept:
                v = extract_json(jud[i][0]["text"])
                verdict = v.get("consistent") if isinstance(v, dict) else None
                if verdict is False:
                    st["inconsistent"] += 1
                    continue
                st["consistent" if verdict is True else "unjudged_kept"] += 1
                still.append(i)
            kept = still
            stats["back_translation"] = dict(st)
        _write_verifiers(ctx.out_dir / "verifiers.jsonl", [{**{k: instructions[i][k] for k in ("id", "instruction", "category", "origin")},
                                                            "functions": cv[i]["functions"], "cases": cv[i]["cases"]} for i in kept])
        if cfg.eval_queries:
            _write_eval_prompts(ctx.out_dir / "eval_prompts.jsonl", ctx.read_input(cfg.eval_queries, None),
                                [instructions[i] | {"functions": cv[i]["functions"]} for i in kept])
        # 5. responses
        prompts, pmeta = {}, {}
        for i in kept:
            r = random.Random(f"{rng_seed}-queries-{i}")
            for q in r.sample(qrows, min(cfg.queries_per_instruction, len(qrows))):
                key = record_id("ifp", i, q["id"])
                prompts[key] = attach(to_chat_prompt(q), instructions[i]["instruction"])
                pmeta[key] = (i, str(q["id"]))
        outs = sample_step(ctx, get_sampler, "responses", prompts, dataclasses.replace(cfg.sampling, n=cfg.responses_per_prompt))
        # 6. scores
        scores = _sandbox_step(ctx, "scores", list(prompts), lambda k: pass_rates(
            cv[pmeta[k][0]]["functions"], [c["text"] for c in outs[k]], pool))
    stats["responses"] = _write_records(cfg, ctx, prompts, pmeta, outs, scores, instructions)
    ctx.write_json("stats.json", stats)
    return {"instructions": len(instructions), "kept_instructions": len(kept), **stats["responses"]}


def _write_verifiers(path: Path, rows: list[dict]) -> None:
    # Rewritten whole on every run: it is derived from cached steps, so it is identical on resume.
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _write_eval_prompts(path: Path, queries: list[dict], kept: list[dict]) -> None:
    # Every held-out query with every kept constraint; meta.verifiers is what posttrain.evaluation.evaluate
    # reads to compute an instruction-following pass rate for a checkpoint.
    from posttrain.core.records import write_records

    rows = [{"id": record_id("if-eval", v["id"], q["id"]), "prompt": attach(to_chat_prompt(q), v["instruction"]),
             "source": "if_feedback", "meta": {"verifiers": v["functions"], "instruction_id": v["id"],
                                               "constraint": v["instruction"], "query_id": str(q["id"])}}
            for v in kept for q in queries]
    write_records(path, rows, "prompt")


def _write_records(cfg: IFFeedbackConfig, ctx, prompts, pmeta, outs, scores, instructions) -> dict:
    hist: Counter = Counter()
    total = 0
    with RecordWriter(ctx.out_dir / "demonstrations.jsonl", "demonstration") as dw, \
            RecordWriter(ctx.out_dir / "preferences.jsonl", "preference") as pw:
        for key, p in prompts.items():
            iid, qid = pmeta[key]
            meta = {"instruction_id": iid, "constraint": instructions[iid]["instruction"], "query_id": qid}
            seen, chosen, rejected = set(), [], []
            for j, (comp, rate) in enumerate(zip(outs[key], scores[key])):
                total += 1
                hist[f"{rate:.2f}"] += 1
                text = comp["text"].strip()
                if not text or text in seen:
                    continue
                seen.add(text)
                whole = comp["finish"] == "stop" or not cfg.require_stop
                if rate >= cfg.demo_min_pass_rate and whole:
                    dw.write(demonstration(p + [{"role": "assistant", "content": text}], source="if_feedback",
                                           id=record_id("if-demo", key, text), meta={**meta, "pass_rate": rate}))
                if rate >= cfg.chosen_min_pass_rate and whole:
                    chosen.append((rate, text))
                elif rate <= cfg.rejected_max_pass_rate:
                    rejected.append((rate, text))
            chosen.sort(key=lambda x: -x[0])
            for (cr, ct), (rr, rt) in list(zip(chosen, rejected))[: cfg.max_pairs_per_prompt]:
                pw.write(preference(p, ct, rt, source="if_feedback", id=record_id("if-pref", key, ct, rt),
                                    meta={**meta, "chosen_pass_rate": cr, "rejected_pass_rate": rr}))
        return {"prompts": len(prompts), "responses": total, "pass_rate_histogram": dict(sorted(hist.items())),
                "demonstrations": len(dw.ids), "preferences": len(pw.ids)}
