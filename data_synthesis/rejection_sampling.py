"""Stage ``rejection_sampling``: sample k reasoning paths per problem, keep the verified ones.

Input: prompt records (``prompt`` or ``messages``) whose reference answer sits in a
configurable field (``answer_field``: ``meta.answer``, ``answer``, ...; a GSM8K-style
solution ending in ``#### 42`` is reduced to its answer). Problems without a
reference are skipped, or, with ``reward_model`` set, scored by that reward model
(best-of-N).

Output (in the stage folder, written whole at the end):
* ``demonstrations.jsonl``: per problem, up to ``max_per_problem`` correct paths,
  near-duplicates removed (same equation sequence or similar text) and the most
  different ones preferred; best-of-N picks for problems without a reference.
* ``preferences.jsonl``: correct vs incorrect paths of the same problem (and
  best vs worst by reward for best-of-N problems, with ``margin``).
* ``problems.jsonl``: one line per problem with its counts (samples, correct, no
  answer, kept, pairs, pass@1, pass@k).
* ``report.json``: mean pass@1 / pass@k and kept counts per problem.

Resumable: the k paths of a problem are sampled ``chunk_size`` problems per sampler call
and cached per problem in ``steps/paths.jsonl`` as soon as each call returns (seeded per
problem, so a resumed run samples exactly what an uninterrupted one would); best-of-N
rewards are cached in ``steps/rewards.jsonl``. A killed run re-sends only the missing
problems; the records are derived from the caches. Fewer than ``min_success_rate``
usable paths stop the stage before it writes anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from data_synthesis import paths
from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, build_prompt, check_success, get_field,
                                   lazy_sampler, map_step, sample_step, sampler_name, step_path, unique_ids)
from reward import answers as mv
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec, input_label
from posttrain.core.records import demonstration, preference, record_id, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams

log = logging.getLogger("posttrain.rejection_sampling")

DEFAULT_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass
class RejectionSamplingConfig:
    """Keys of stage ``rejection_sampling``."""

    input: InputSpec = key(doc="prompt records (JSONL/Parquet/datasets) with a reference answer", input="prompt")
    answer_field: str = key("meta.answer", "dotted path of the reference answer in each record (\"answer\", \"meta.answer\")")
    k: int = key(8, "reasoning paths sampled per problem (overrides sampling.n)")
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.8, max_tokens=512))
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    system_prompt: str | None = key(None, "optional system turn put before each problem")
    instruction: str = key(DEFAULT_INSTRUCTION, "appended to the last user turn (\"\" sends the problem as is)")
    extractors: list[str] = key(factory=lambda: list(mv.DEFAULT_ORDER), doc="answer extractors, in order")
    rel_tol: float = key(1e-4, "relative tolerance of numeric equivalence")
    use_math_verify: bool = key(True, "symbolic equivalence with the math-verify library when installed")
    require_terminated: bool = key(True, "a path cut by max_tokens never counts as correct")
    max_per_problem: int = key(4, "m: at most this many correct paths kept per problem")
    similarity_threshold: float = key(0.9, "paths at least this similar to a kept one are duplicates")
    max_pairs_per_problem: int = key(4, "correct-vs-incorrect preference pairs per problem")
    reward_model: str | None = key(None, "problems without a reference: best-of-N by this reward model (None: skip)",
                                   model=True)
    reward_tokenizer: str | None = key(None, "the reward model's tokenizer folder (default: the reward model's own)",
                                       model=True)
    min_reward_margin: float = key(0.0, "best-of-N: a best-vs-worst pair needs at least this score gap")
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, CHUNK_DOC)
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: a path with an answer to check, or a non-empty "
                                        "one for best-of-N)")
    limit: int | None = key(None, "use only the first N problems")

    def check(self) -> None:
        """Cross-field checks."""
        bad = [e for e in self.extractors if e not in mv.EXTRACTORS]
        if bad or not self.extractors:
            raise ValueError(f"extractors: unknown {bad} (choose from {', '.join(mv.EXTRACTORS)})")
        if self.k < 1 or self.max_per_problem < 0 or self.chunk_size < 1:
            raise ValueError("k and chunk_size must be >= 1, max_per_problem >= 0")
        if not 0 < self.similarity_threshold <= 1 or not 0 <= self.min_success_rate <= 1:
            raise ValueError("similarity_threshold must be in (0, 1], min_success_rate in [0, 1]")


# ---------------------------------------------------------------- judging one problem (pure)

def judge_paths(texts: list[str], finish_reasons: list[str], reference: str, cfg: RejectionSamplingConfig) -> dict:
    """Verify each path against the reference; choose diverse correct paths and preference pairs.

    Returns ``answers``, ``correct`` (per path), ``kept`` (indices of kept correct paths) and
    ``pairs`` (index pairs chosen/rejected).
    """
    answers = [mv.extract_answer(t, cfg.extractors) for t in texts]
    correct = []
    for t, a, fr in zip(texts, answers, finish_reasons):
        ok = mv.answers_equal(a, reference, rel_tol=cfg.rel_tol, use_math_verify=cfg.use_math_verify)
        correct.append(ok and (fr == "stop" or not cfg.require_terminated))
    good = [i for i, c in enumerate(correct) if c]
    picked = paths.select_diverse([texts[i] for i in good], cfg.max_per_problem, cfg.similarity_threshold)
    kept = [good[j] for j in picked]
    # rejected candidates: wrong answers first (clearer signal), then paths without an answer;
    # identical texts are used once
    seen: set[str] = set()
    bad = []
    for i in sorted((i for i, c in enumerate(correct) if not c), key=lambda i: answers[i] is None):
        if texts[i].strip() and texts[i] not in seen:
            seen.add(texts[i])
            bad.append(i)
    chosen_pool = kept or good[:1]
    pairs = []
    if chosen_pool and bad:
        for i in range(min(cfg.max_pairs_per_problem, max(len(chosen_pool), len(bad)))):
            pairs.append((chosen_pool[i % len(chosen_pool)], bad[i % len(bad)]))
    return {"answers": answers, "correct": correct, "kept": kept, "pairs": pairs}


# ---------------------------------------------------------------- the stage

def run(cfg: RejectionSamplingConfig, ctx) -> dict:
    """Entry point of stage kind ``rejection_sampling``."""
    src = input_label(cfg.input)
    problems: dict[str, tuple[list[dict], str | None]] = {}
    for rec in ctx.read_input(cfg.input, "prompt"):
        ref = mv.reference_answer(get_field(rec, cfg.answer_field))
        problems.setdefault(str(rec["id"]), (build_prompt(rec, cfg.system_prompt, cfg.instruction), ref))
    if cfg.limit is not None:
        problems = dict(list(problems.items())[: cfg.limit])
    if not cfg.reward_model:
        n_noref = sum(ref is None for _, ref in problems.values())
        if n_noref:
            log.warning("%s: %d problems have no reference at %r and no reward_model is set: skipped",
                        src, n_noref, cfg.answer_field)
    todo = {pid: prompt for pid, (prompt, ref) in problems.items() if ref is not None or cfg.reward_model}
    outs = sample_step(ctx, lazy_sampler(ctx, cfg.sampler, cfg.model), "paths", todo, replace(cfg.sampling, n=cfg.k),
                       cfg.chunk_size)
    bon = [pid for pid in todo if problems[pid][1] is None]
    scorer: list = []  # loaded on first use: a fully cached step loads no reward model
    scores = map_step(ctx, "rewards", bon, lambda chunk: _rewards(ctx, cfg, scorer, chunk, problems, outs),
                      cfg.chunk_size) if bon else {}
    source = f"rejection_sampling:{sampler_name(ctx, cfg.sampler)}"
    demos: list[dict] = []
    prefs: list[dict] = []
    rows: list[dict] = []
    usable = total = 0
    for pid, (prompt, ref) in problems.items():
        if pid not in todo:
            rows.append({"id": pid, "prompt": prompt, "source": "rejection_sampling",
                         "meta": {"problem_id": pid, "mode": "skipped_no_reference"}})
            continue
        comps = outs[pid]
        if ref is None:
            st = _best_of_n(pid, prompt, comps, scores[pid], cfg, demos, prefs, source)
            usable += sum(bool(c["text"].strip()) for c in comps)
        else:
            st = _with_reference(pid, prompt, ref, comps, cfg, demos, prefs, source)
            usable += st["samples"] - st["no_answer"]
        total += len(comps)
        rows.append({"id": pid, "prompt": prompt, "source": source, "meta": st})
    check_success(ctx.spec.name, "paths usable", usable, total, cfg.min_success_rate,
                  [step_path(ctx, "paths")])
    write_records(ctx.out_dir / "demonstrations.jsonl", unique_ids(demos), "demonstration")
    write_records(ctx.out_dir / "preferences.jsonl", unique_ids(prefs), "preference")
    write_records(ctx.out_dir / "problems.jsonl", rows, "prompt")
    return _report(ctx, [r["meta"] for r in rows], len(unique_ids(demos)), len(unique_ids(prefs)))


def _rewards(ctx, cfg: RejectionSamplingConfig, scorer: list, chunk: list[str], problems: dict,
             outs: dict) -> list[list[float]]:
    """Reward-model scores of the paths of best-of-N problems ``chunk`` (``scorer``: a one-slot holder)."""
    if not scorer:
        from reward.scorer import RewardScorer  # lazy: pulls in torch

        rm = ctx.resolve_model(cfg.reward_model, "reward_model")
        tok = ctx.resolve_model(cfg.reward_tokenizer, "reward_tokenizer")
        scorer.append(RewardScorer(rm, tok) if tok else RewardScorer(rm))
    flat_p = [problems[pid][0] for pid in chunk for _ in outs[pid]]
    flat_r = [c["text"] for pid in chunk for c in outs[pid]]
    flat = [float(s) for s in scorer[0].score(flat_p, flat_r)]
    res, i = [], 0
    for pid in chunk:
        res.append(flat[i: i + len(outs[pid])])
        i += len(outs[pid])
    return res


def _with_reference(pid: str, prompt: list[dict], ref: str, comps: list[dict], cfg: RejectionSamplingConfig,
                    demos: list[dict], prefs: list[dict], source: str) -> dict:
    texts = [c["text"] for c in comps]
    j = judge_paths(texts, [c["finish"] for c in comps], ref, cfg)
    n_correct = sum(j["correct"])
    for rank, i in enumerate(j["kept"]):
        demos.append(demonstration(prompt + [{"role": "assistant", "content": texts[i]}], source=source,
                                   id=record_id("rs-demo", pid, texts[i]),
                                   meta={"problem_id": pid, "reference": ref, "answer": j["answers"][i],
                                         "path_index": i, "diversity_rank": rank, "correct": n_correct,
                                         "samples": len(texts)}))
    for a, b in j["pairs"]:
        prefs.append(preference(prompt, texts[a], texts[b], source=source,
                                id=record_id("rs-pref", pid, texts[a], texts[b]),
                                meta={"problem_id": pid, "reference": ref, "chosen_answer": j["answers"][a],
                                      "rejected_answer": j["answers"][b], "pair": "correct_vs_incorrect"}))
    return {"problem_id": pid, "mode": "reference", "reference": ref, "samples": len(texts), "correct": n_correct,
            "no_answer": sum(a is None for a in j["answers"]), "kept": len(j["kept"]), "pairs": len(j["pairs"]),
            "pass@1": paths.pass_at_k(len(texts), n_correct, 1),
            "pass@k": paths.pass_at_k(len(texts), n_correct, len(texts))}


def _best_of_n(pid: str, prompt: list[dict], comps: list[dict], scores: list[float], cfg: RejectionSamplingConfig,
               demos: list[dict], prefs: list[dict], source: str) -> dict:
    # only responses the model finished itself compete; ties go to the earliest sample
    idx = [i for i, c in enumerate(comps) if c["text"].strip() and (c["finish"] == "stop" or not cfg.require_terminated)]
    stats = {"problem_id": pid, "mode": "best_of_n", "samples": len(comps), "kept": 0, "pairs": 0,
             "scores": [round(s, 4) for s in scores]}
    if not idx:
        return stats
    best = max(idx, key=lambda i: (scores[i], -i))
    worst = min(idx, key=lambda i: (scores[i], i))
    bt, wt = comps[best]["text"], comps[worst]["text"]
    demos.append(demonstration(prompt + [{"role": "assistant", "content": bt}], source=source,
                               id=record_id("rs-bon", pid, bt),
                               meta={"problem_id": pid, "reward": scores[best], "path_index": best}))
    stats["kept"] = 1
    margin = scores[best] - scores[worst]
    if best != worst and bt != wt and margin >= cfg.min_reward_margin and margin > 0:
        prefs.append(preference(prompt, bt, wt, source=source, margin=margin,
                                id=record_id("rs-bon-pref", pid, bt, wt),
                                meta={"problem_id": pid, "pair": "best_vs_worst_reward",
                                      "chosen_reward": scores[best], "rejected_reward": scores[worst]}))
        stats["pairs"] = 1
    return stats


def _report(ctx, rows: list[dict], n_demo: int, n_pref: int) -> dict:
    ref_rows = [r for r in rows if r.get("mode") == "reference"]
    mean = (lambda xs: round(sum(xs) / len(xs), 4) if xs else None)
    summary = {
        "problems": len(rows),
        "with_reference": len(ref_rows),
        "best_of_n": sum(r.get("mode") == "best_of_n" for r in rows),
        "skipped_no_reference": sum(r.get("mode") == "skipped_no_reference" for r in rows),
        "pass@1": mean([r["pass@1"] for r in ref_rows]),
        "pass@k": mean([r["pass@k"] for r in ref_rows]),
        "no_answer_rate": mean([r["no_answer"] / max(1, r["samples"]) for r in ref_rows]),
        "demonstrations": n_demo,
        "preferences": n_pref,
    }
    ctx.write_json("report.json", {**summary, "per_problem": rows})
    return summary
