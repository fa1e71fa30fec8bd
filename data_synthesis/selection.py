"""Stage ``select``: complexity-first diverse sampling of tagged instructions to a budget.

Input: tagged instruction records (the ``records.jsonl`` of stage ``instag``:
``meta.tags`` lists each instruction's canonical tags; records without tags
count as having none).

Method (InsTag): optionally score every instruction for *semantic richness*
and *intent completeness* and drop those below ``min_completeness``; sort by
number of tags (complexity) descending, then by the mean score, then by a
seeded random tie-break; walk the list and take an instruction when it adds at
least one tag not yet covered; when a pass ends with the budget unmet, start a
new pass over the remaining instructions with an empty coverage set; when no
remaining instruction has tags, fill up in sort order. Deterministic for a seed.

Scores (``scoring``):

* ``heuristic`` (default, no model): richness = 1 - exp(-u / 15), u the number of
  distinct content words (stop words removed; each CJK character counts as a
  word); completeness = mean of four checks: a task signal (a question mark, or
  an imperative / question word such as write, explain, list, how, what),
  at least ``min_words`` words, a finished ending (final punctuation, bracket,
  quote or code fence, or a last word that is not a stop word), and no unfilled placeholder (``[insert ...]``, ``<your
  ...>``, ``TODO``, ``...`` at the end).
* ``llm``: the sampler judges both on a 1-5 scale as JSON; scores map to
  (x - 1) / 4; an unparseable judgement falls back to the heuristic and is
  counted (``judge_failed``). Judgements are sampled in chunks and cached in
  ``steps/judge.jsonl`` (resumable); fewer than ``min_success_rate`` parseable judgements
  stop the stage before it writes anything.
* ``none``: both scores are 0; ordering is by tag count and the seed.

Outputs: ``records.jsonl`` (the selected records in selection order;
``meta.select`` = rank, pass, n_tags, richness, completeness) and
``report.json`` (count, distinct tags, tag coverage, tags per instruction and
mean scores, before and after; also in the manifest).
"""

from __future__ import annotations

import heapq
import math
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, check_success, extract_json,
                                   instruction_text, lazy_sampler, sample_step, step_path)
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams


@dataclass
class SelectConfig:
    """Keys of stage ``select`` (complexity-first diverse sampling)."""

    input: InputSpec = key(doc="tagged records (stage instag's records.jsonl or folder)", input=True)
    budget: int = key(100, "how many instructions to select")
    scoring: Literal["none", "heuristic", "llm"] = key("heuristic", "richness/completeness scores (see module doc)")
    min_completeness: float = key(0.0, "drop instructions whose completeness score is below this (0..1)")
    min_words: int = key(3, "heuristic completeness: fewer words than this fails the length check")
    reset_coverage: bool = key(True, "start a new pass with empty coverage when a pass ends under budget")
    sampler: SamplerConfig | None = key(None, "scoring: llm — default: the recipe's sampler")
    model: str | None = key(None, "scoring: llm — default: the recipe's model.path", model=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=64))
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, "scoring: llm — " + CHUNK_DOC)
    min_success_rate: float = key(0.05, "scoring: llm — " + FLOOR_DOC + " (usable: a parseable judgement)")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field checks; judge keys are refused unless ``scoring`` is ``llm``."""
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if not 0 <= self.min_completeness <= 1 or not 0 <= self.min_success_rate <= 1:
            raise ValueError("min_completeness and min_success_rate must be in [0, 1]")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        stray = sorted(given & {"sampler", "model", "sampling", "chunk_size", "min_success_rate"})
        if self.scoring != "llm" and stray:
            raise ValueError(f"{stray[0]} has no effect with scoring {self.scoring!r} (only with scoring: llm)")


# ---------------------------------------------------------------- heuristic scores (pure)

STOP_WORDS = set("""a an the and or but if then else of to in on at by for with from as is are was were be been being
it its this that these those i you he she we they me my your our their them his her him do does did done
so such than too very can could should would will shall may might must not no nor only own same just also
about into over under again further once here there when where which who whom what why how all any both each
few more most other some please""".split())

TASK_WORDS = set("""write explain list give create describe summarize summarise translate compare calculate compute find
solve generate make design draft compose rewrite edit classify identify suggest recommend analyze analyse evaluate
convert implement build plan outline tell name define prove show help provide propose debug fix refactor
how what why when where which who whom whose can could should would is are do does""".split())

_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]|[^\W\d_]+|\d+", re.U)
_PLACEHOLDER = re.compile(r"\[(insert|your|add|placeholder)[^\]]*\]|<(your|insert)[^>]*>|\bTODO\b|\.\.\.\s*$|…\s*$", re.I)
_ENDING = re.compile(r"""[.?!)\]"'`:;。？！）」』]\s*$""")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (each CJK character is a word)."""
    return [w.lower() for w in _WORD.findall(text)]


def richness_score(text: str) -> float:
    """Semantic richness in [0, 1): saturating in the number of distinct content words."""
    content = {w for w in words(text) if w not in STOP_WORDS and (len(w) > 1 or not w.isascii())}
    return round(1 - math.exp(-len(content) / 15), 4)


def completeness_checks(text: str, min_words: int = 3) -> dict[str, bool]:
    """The four intent-completeness checks of the heuristic (see module docstring)."""
    ws = words(text)
    return {"task_signal": "?" in text or "？" in text or any(w in TASK_WORDS for w in ws),
            "long_enough": len(ws) >= min_words,
            # a cut-off request ends mid-phrase ("... about the", "... and,"): punctuation or a content word
            "finished": bool(_ENDING.search(text.strip())) or (bool(re.search(r"\w\s*$", text.strip()))
                                                               and bool(ws) and ws[-1] not in STOP_WORDS),
            "no_placeholder": not _PLACEHOLDER.search(text)}


def completeness_score(text: str, min_words: int = 3) -> float:
    """Intent completeness in [0, 1]: the fraction of ``completeness_checks`` that pass."""
    c = completeness_checks(text, min_words)
    return round(sum(c.values()) / len(c), 4)


# ---------------------------------------------------------------- selection (pure)

def complexity_first_diverse(tags: list[list[str]], budget: int, scores: list[float] | None = None, seed: int = 0,
                             reset_coverage: bool = True) -> list[tuple[int, int]]:
    """Indices chosen by complexity-first diverse sampling, with the pass each was taken in.

    Sort by tag count (desc), score (desc), seeded random; take an item when it adds
    an uncovered tag; repeat passes with empty coverage until ``budget``; then fill
    with tag-less leftovers in sort order. Returns ``[(index, pass_number)]``.

    O(N log N) in the number of tag occurrences: instead of rescanning every remaining item in
    each pass, each tag keeps the queue of remaining items that carry it (in sort order); within
    a pass the next item taken is the earliest queue head among the tags not yet covered (an item
    is taken exactly when one of its tags is still uncovered when the walk reaches it). Every pass
    takes the first remaining item of every tag, so the heads examined over all passes add up to
    the number of tag occurrences.
    """
    rng = random.Random(seed)
    tie = [rng.random() for _ in tags]
    scores = scores or [0.0] * len(tags)
    sets = [set(t) for t in tags]
    order = sorted(range(len(tags)), key=lambda i: (-len(sets[i]), -scores[i], tie[i]))
    # From here on items are sort positions and tags are integer ids: flat lists of small ints
    # and integer heap keys (position * n_tags + tag) keep the work per occurrence small at 1e5+.
    ids: dict[str, int] = {}
    at = [tuple(ids.setdefault(t, len(ids)) for t in sets[i]) for i in order]  # tag ids of each position
    n_tags = len(ids)
    queues: list[list[int]] = [[] for _ in range(n_tags)]  # tag -> positions carrying it, ascending
    for p, tids in enumerate(at):
        for u in tids:
            queues[u].append(p)
    heads = [0] * n_tags  # queues[u][:heads[u]] are taken
    covered_in = [-1] * n_tags  # the pass in which each tag was last covered
    taken = bytearray(len(order))
    live = list(range(n_tags))  # tags whose queue may still hold an untaken position
    chosen: list[tuple[int, int]] = []
    n_pass = 0
    while len(chosen) < budget:
        heap, still = [], []
        for u in live:
            q, h = queues[u], heads[u]
            while h < len(q) and taken[q[h]]:
                h += 1
            heads[u] = h
            if h < len(q):
                heap.append(q[h] * n_tags + u)
                still.append(u)
        live = still
        if not heap:  # only tag-less items remain: they fill up as the next pass
            n_pass += 1
            break
        heapq.heapify(heap)
        while heap and len(chosen) < budget:
            p, u = divmod(heapq.heappop(heap), n_tags)
            if covered_in[u] == n_pass:
                continue
            # the earliest remaining position with an uncovered tag; its head is gone, and the next
            # position of u cannot be taken in this pass (u is covered now)
            taken[p] = 1
            chosen.append((order[p], n_pass))
            for v in at[p]:
                covered_in[v] = n_pass
        n_pass += 1
        if not reset_coverage:
            break
    # fill with what no pass took (tag-less items, or the rest when passes are not repeated), in sort order
    if len(chosen) < budget:
        chosen += [(order[p], n_pass) for p in range(len(order)) if not taken[p]][: budget - len(chosen)]
    return chosen


def describe(tag_lists: list[list[str]], rich: list[float], comp: list[float], universe: int | None = None) -> dict:
    """Coverage and complexity summary of a set of tagged instructions."""
    distinct = {t for tags in tag_lists for t in tags}
    n = [len(set(t)) for t in tag_lists]
    return {"instructions": len(tag_lists), "distinct_tags": len(distinct),
            "tag_coverage": round(len(distinct) / universe, 4) if universe else None,
            "mean_tags": round(statistics.fmean(n), 3) if n else 0.0,
            "median_tags": statistics.median(n) if n else 0,
            "tag_count_histogram": {str(k): v for k, v in sorted(Counter(n).items())},
            "mean_richness": round(statistics.fmean(rich), 4) if rich else 0.0,
            "mean_completeness": round(statistics.fmean(comp), 4) if comp else 0.0}


# ---------------------------------------------------------------- LLM judging

JUDGE_PROMPT = """Rate the user instruction below on two scales from 1 (worst) to 5 (best).
semantic_richness: how much distinct, meaningful content and detail it carries.
intent_completeness: whether it states a clear, complete request that can be answered without guessing.
Answer with JSON only: {{"semantic_richness": N, "intent_completeness": N}}

Instruction:
<<<
{instruction}
>>>"""


def parse_judgement(text: str) -> tuple[float, float] | None:
    """``(richness, completeness)`` in [0, 1] from a judge answer, or None when unparseable."""
    def want(o):
        if not isinstance(o, dict):
            return None
        r, c = o.get("semantic_richness", o.get("richness")), o.get("intent_completeness", o.get("completeness"))
        if isinstance(r, (int, float)) and isinstance(c, (int, float)) and 1 <= r <= 5 and 1 <= c <= 5:
            return (round((r - 1) / 4, 4), round((c - 1) / 4, 4))
        return None

    return extract_json(text or "", want)


def _llm_scores(cfg: SelectConfig, ctx, recs: list[dict], texts: list[str]) -> tuple[list[tuple[float, float]], int]:
    jobs = {r["id"]: [{"role": "user", "content": JUDGE_PROMPT.format(instruction=t)}] for r, t in zip(recs, texts)}
    outs = sample_step(ctx, lazy_sampler(ctx, cfg.sampler, cfg.model), "judge", jobs, cfg.sampling, cfg.chunk_size)
    scores, failed = [], 0
    for r, t in zip(recs, texts):
        got = parse_judgement(outs[r["id"]][0]["text"])
        if got is None:  # fall back to the heuristic, and say so
            got = (richness_score(t), completeness_score(t, cfg.min_words))
            failed += 1
        scores.append(got)
    check_success(ctx.spec.name, "judgements parsed", len(recs) - failed, len(recs), cfg.min_success_rate,
                  [step_path(ctx, "judge")])
    return scores, failed


# ---------------------------------------------------------------- the stage

def run(cfg: SelectConfig, ctx) -> dict:
    """Entry point of stage kind ``select``."""
    recs = ctx.read_input(cfg.input, None)
    texts = [instruction_text(r) for r in recs]
    tags = [list((r.get("meta") or {}).get("tags") or []) for r in recs]
    judge_failed = 0
    if cfg.scoring == "heuristic":
        rich = [richness_score(t) for t in texts]
        comp = [completeness_score(t, cfg.min_words) for t in texts]
    elif cfg.scoring == "llm":
        sc, judge_failed = _llm_scores(cfg, ctx, recs, texts)
        rich = [s[0] for s in sc]
        comp = [s[1] for s in sc]
    else:
        rich = comp = [0.0] * len(recs)
    universe = len({t for ts in tags for t in ts})
    before = describe(tags, rich, comp, universe)
    keep = [i for i in range(len(recs)) if comp[i] >= cfg.min_completeness]
    chosen = complexity_first_diverse([tags[i] for i in keep], cfg.budget,
                                      [(rich[i] + comp[i]) / 2 for i in keep], ctx.seed, cfg.reset_coverage)
    out = []
    for rank, (j, n_pass) in enumerate(chosen):
        i = keep[j]
        r = dict(recs[i])
        r["meta"] = {**(r.get("meta") or {}), "select": {"rank": rank, "pass": n_pass, "n_tags": len(set(tags[i])),
                                                        "richness": rich[i], "completeness": comp[i]}}
        out.append(r)
    write_records(ctx.out_dir / "records.jsonl", out, "prompt")
    idx = [keep[j] for j, _ in chosen]
    after = describe([tags[i] for i in idx], [rich[i] for i in idx], [comp[i] for i in idx], universe)
    report = {"budget": cfg.budget, "scoring": cfg.scoring, "dropped_incomplete": len(recs) - len(keep),
              "judge_failed": judge_failed, "passes": 1 + max((p for _, p in chosen), default=0),
              "before": before, "after": after}
    ctx.write_json("report.json", report)
    return report
