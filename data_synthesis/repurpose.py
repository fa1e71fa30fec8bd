"""Stage ``repurpose``: turn existing text into demonstrations (Qwen2 report 4.1.2, "data repurposing").

Two modes (key ``mode``):

* ``literary`` -- inputs are plain-text works (``.txt`` files or folders of
  them; optional ``Title:`` / ``Author:`` / ``Source:`` header lines before the
  first blank line). Each work is chunked on paragraph boundaries; for every
  chunk and every detail level the model writes the request a user could have
  made for which the chunk is the answer (instruction back-translation). Each
  (instruction, original chunk) pair is a demonstration: the response is the
  human-written text, never model output.
* ``roleplay`` -- inputs are character profiles (``.json`` with ``name`` and
  ``profile``, optional ``setting``; or ``.txt`` whose first line is the name).
  The model writes in-character queries of two kinds: grounded ones the
  profile can answer, and ones whose premise the character could not know
  (later events, unseen technology); then it answers each in character,
  reading the profile (a reading-comprehension task), refusing the unknowable
  ones in the character's voice. A model check (``check_refusals``) keeps
  refusals only for unknowable premises and answers only for grounded ones.
  Demonstrations carry the role (name + profile) as the system message; the
  synthesis-time guidance is not kept.

Output: ``OUT/records.jsonl`` (demonstrations; ``meta`` names the work/chunk/
level or the character/query kind), ``stats.json`` (counts per step and drop
reasons), ``steps/*.jsonl`` (cached model outputs for resuming).
Resumable: model calls are sampled ``chunk_size`` prompts at a time and cached per
item as each call returns, so a killed run redoes only what is missing; the records
are derived from the caches and written whole at the end, unless fewer than
``min_success_rate`` of the outputs are usable.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, check_success, extract_json, lazy_sampler,
                                   norm_text, read_text_inputs, sample_step, step_path, unique_ids)
from posttrain.core.config import key
from posttrain.core.records import demonstration, record_id, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams

# Detail levels of back-translated literary instructions: from a bare topic to a full brief.
LEVELS: dict[str, str] = {
    "brief": "very short (one sentence): name only the kind of text and its subject",
    "moderate": "two or three sentences: the kind of text, the subject, the tone and point of view",
    "detailed": "a full brief: the kind of text, setting, characters, the events or ideas it must cover "
                "in order, tone, style and approximate length",
}

# Phrases showing an instruction leans on the passage instead of standing alone.
_PASSAGE_REFS = ("the passage", "this passage", "the excerpt", "this excerpt", "the text above", "the above text")
# Phrases showing a role-play answer broke character.
_CHARACTER_BREAKS = ("as an ai", "language model", "i am an ai", "i'm an ai", "as a character", "my profile")


# keys read by one mode only (a key of the other mode has no effect)
LITERARY_KEYS = ("chunk_words", "min_chunk_words", "levels", "instructions_per_level", "max_instruction_words",
                 "leak_ngram")
ROLEPLAY_KEYS = ("grounded_queries", "unknowable_queries", "answers_per_query", "check_refusals", "judge_sampling")


@dataclass
class RepurposeConfig:
    """Keys of stage ``repurpose``."""

    mode: Literal["literary", "roleplay"] = key(doc="literary back-translation or role-play from character profiles")
    inputs: list[str] = key(doc="files or folders: .txt works (literary) or .json/.txt profiles (roleplay)", input=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.8, max_tokens=256, seed=0))
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    require_stop: bool = key(True, "drop model outputs cut by max_tokens (finish_reason \"length\")")
    # literary
    chunk_words: int = key(300, "a chunk holds whole paragraphs up to this many words")
    min_chunk_words: int = key(40, "a shorter trailing chunk is merged into the previous one")
    levels: list[str] = key(factory=lambda: list(LEVELS), doc="detail levels (keys of LEVELS)")
    instructions_per_level: int = key(1, "samples per (chunk, level)")
    max_instruction_words: int = key(200, "longer instructions are dropped")
    leak_ngram: int = key(12, "drop an instruction sharing this many consecutive words with its chunk")
    # roleplay
    grounded_queries: int = key(4, "queries per character answerable from the profile")
    unknowable_queries: int = key(2, "queries per character whose premise the character cannot know")
    answers_per_query: int = key(1, "in-character answers sampled per query")
    check_refusals: bool = key(True, "model check: keep unknowable-premise answers that decline, grounded ones that do not")
    judge_sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=32, seed=0))
    limit: int | None = key(None, "use only the first N works / characters")
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, CHUNK_DOC)
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: a non-empty instruction (literary), a parseable "
                                        "query list (roleplay))")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field checks; a key that would have no effect is an error."""
        other = ROLEPLAY_KEYS if self.mode == "literary" else LITERARY_KEYS
        useless = [k for k in other if k in given]
        if "judge_sampling" in given and not self.check_refusals:
            useless.append("judge_sampling")
        if useless:
            raise ValueError(f"{useless[0]} has no effect with mode: {self.mode}"
                             + (" and check_refusals: false" if useless[0] == "judge_sampling" and
                                self.mode == "roleplay" else "") + " (remove it)")
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad:
            raise ValueError(f"levels: unknown level(s) {bad} (expected some of: {', '.join(LEVELS)})")
        if self.chunk_words < 1 or self.min_chunk_words < 0 or self.instructions_per_level < 1 or self.answers_per_query < 1:
            raise ValueError("chunk_words, instructions_per_level and answers_per_query must be >= 1")
        if self.chunk_size < 1 or not 0 <= self.min_success_rate <= 1:
            raise ValueError("chunk_size must be >= 1 and min_success_rate in [0, 1]")


# ---------------------------------------------------------------- literary: pure parts

def parse_work(text: str, default_title: str) -> tuple[dict, str]:
    """Split optional ``Key: value`` header lines (before the first blank line) from the body."""
    lines = text.replace("\r\n", "\n").split("\n")
    meta: dict[str, str] = {}
    i = 0
    while i < len(lines) and re.fullmatch(r"(Title|Author|Source|Year):\s*.+", lines[i].strip()):
        k, _, v = lines[i].partition(":")
        meta[k.strip().lower()] = v.strip()
        i += 1
    if meta and i < len(lines) and lines[i].strip():
        meta, i = {}, 0  # header lines must be followed by a blank line; otherwise it is body text
    meta.setdefault("title", default_title)
    meta.setdefault("author", "unknown")
    return meta, "\n".join(lines[i:]).strip()


def _split_long(par: str, max_words: int) -> list[str]:
    # A paragraph longer than a chunk is cut at sentence ends, never mid-sentence
    # unless one sentence alone is longer than a chunk.
    sents = re.split(r"(?<=[.!?;])\s+", par)
    out, cur = [], []
    for s in sents:
        words = s.split()
        while len(words) > max_words:
            if cur:
                out.append(" ".join(cur))
                cur = []
            out.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if cur and len(cur) + len(words) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur.extend(words)
    if cur:
        out.append(" ".join(cur))
    return out


def chunk_text(body: str, max_words: int, min_words: int) -> list[str]:
    """Chunks of whole paragraphs (blank-line separated) of at most ``max_words`` words each.

    Paragraph breaks are kept inside a chunk. A trailing chunk shorter than
    ``min_words`` is merged into the previous one (a chunk may then exceed
    ``max_words`` by less than ``min_words``).
    """
    pars = [re.sub(r"\s*\n\s*", " ", p).strip() for p in re.split(r"\n\s*\n", body)]
    pieces: list[str] = []
    for p in pars:
        if p:
            pieces.extend(_split_long(p, max_words) if len(p.split()) > max_words else [p])
    chunks: list[list[str]] = []
    count = 0
    for p in pieces:
        n = len(p.split())
        if chunks and count + n <= max_words:
            chunks[-1].append(p)
            count += n
        else:
            chunks.append([p])
            count = n
    if len(chunks) > 1 and sum(len(p.split()) for p in chunks[-1]) < min_words:
        chunks[-2].extend(chunks.pop())
    return ["\n\n".join(c) for c in chunks]


def literary_prompt(chunk: str, meta: dict, level: str) -> list[dict]:
    """The back-translation prompt: which request does this passage answer, at this level of detail."""
    return [{"role": "user", "content": (
        f"Here is a passage from \"{meta['title']}\" by {meta['author']}.\n\n<passage>\n{chunk}\n</passage>\n\n"
        "Write the request a user could have given a writer, for which this passage is an excellent answer. "
        f"Level of detail: {LEVELS[level]}. The request must stand alone: do not quote the passage and do not "
        "say that it already exists. Reply with the request only.")}]


def clean_instruction(text: str, chunk: str, max_words: int, leak_ngram: int) -> tuple[str | None, str]:
    """Normalise a generated instruction; return ``(instruction, "ok")`` or ``(None, drop_reason)``."""
    s = text.strip()
    s = re.sub(r"^(?:\*\*)?(?:request|instruction|user)\s*:\s*(?:\*\*)?\s*", "", s, flags=re.I).strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    if not s:
        return None, "empty"
    words = s.split()
    if len(words) > max_words:
        return None, "too_long"
    low = s.lower()
    if any(r in low for r in _PASSAGE_REFS):
        return None, "refers_to_passage"
    if leak_ngram > 0 and len(words) >= leak_ngram:
        cw = norm_text(chunk).split()
        grams = {tuple(cw[i:i + leak_ngram]) for i in range(len(cw) - leak_ngram + 1)}
        iw = norm_text(s).split()
        if any(tuple(iw[i:i + leak_ngram]) in grams for i in range(len(iw) - leak_ngram + 1)):
            return None, "copies_text"
    return s, "ok"


# ---------------------------------------------------------------- role-play: pure parts

def load_character(path: Path) -> dict:
    """Read a character profile: ``.json`` {name, profile, setting?} or ``.txt`` (first line = name)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg})") from None
        for k in ("name", "profile"):
            if not isinstance(d, dict) or not isinstance(d.get(k), str) or not d[k].strip():
                raise ValueError(f"{path}: '{k}' must be a non-empty string")
        return {"name": d["name"].strip(), "profile": d["profile"].strip(), "setting": str(d.get("setting", "")).strip()}
    lines = text.strip().split("\n")
    name = re.sub(r"^name\s*:\s*", "", lines[0].strip(), flags=re.I)
    profile = "\n".join(lines[1:]).strip()
    if not name or not profile:
        raise ValueError(f"{path}: expected the character's name on the first line and the profile below it")
    return {"name": name, "profile": profile, "setting": ""}


def role_system(ch: dict) -> str:
    """The role as a system message: who to be, and the profile to stay faithful to."""
    setting = f"\nSetting: {ch['setting']}" if ch.get("setting") else ""
    return (f"You are {ch['name']}. Stay in character: speak as {ch['name']} would, know only what "
            f"{ch['name']} could know, and never mention being an AI.{setting}\n\nProfile:\n{ch['profile']}")


def query_prompt(ch: dict, kind: str, k: int) -> list[dict]:
    """Ask for ``k`` queries to the character: ``grounded`` (profile answers them) or ``unknowable``."""
    if kind == "grounded":
        ask = (f"Write {k} different questions or requests a user might say to {ch['name']} in conversation, "
               f"that {ch['name']} can answer from the life, work and knowledge described in the profile.")
    else:
        ask = (f"Write {k} different questions to {ch['name']} whose premise {ch['name']} could not know: events "
               "after their time, technology or places they never met, or facts the profile gives them no way "
               "to know. Phrase them naturally, as if the user assumed the character knew.")
    return [{"role": "user", "content": f"Character: {ch['name']}\nProfile:\n{ch['profile']}\n\n{ask} "
                                        "Reply with a JSON list of strings only."}]


def answer_prompt(ch: dict, kind: str, query: str) -> list[dict]:
    """The generation prompt: the role plus guidance for this kind of query (guidance is not kept)."""
    if kind == "grounded":
        guide = (f"Answer in the first person as {ch['name']}, in their voice, using only facts the profile "
                 "supports; add colour, not new facts.")
    else:
        guide = (f"The user's question rests on something {ch['name']} cannot know. Stay in character and decline: "
                 f"show {ch['name']}'s honest puzzlement in their own voice, and do not use any knowledge they could "
                 "not have.")
    return [{"role": "system", "content": role_system(ch) + "\n\nGuidance for this reply: " + guide},
            {"role": "user", "content": query}]


def refusal_check_prompt(ch: dict, query: str, answer: str) -> list[dict]:
    """Ask whether an in-character answer declines the question (JSON ``{"declines": bool}``)."""
    return [{"role": "user", "content": (
        f"A user asked {ch['name']}: {query}\n{ch['name']} replied: {answer}\n\nDoes the reply decline or say that "
        f"{ch['name']} does not know or understand what the question refers to? "
        'Reply with JSON only: {"declines": true} or {"declines": false}')}]


def parse_queries(text: str, k: int) -> list[str] | None:
    """Queries from a JSON list (of strings or of {"query": ...}); None when the reply is malformed."""
    data = extract_json(text)
    if isinstance(data, dict):
        data = data.get("queries", data.get("questions"))
    if not isinstance(data, list):
        return None
    out, seen = [], set()
    for q in data:
        if isinstance(q, dict):
            q = q.get("query", q.get("question"))
        if isinstance(q, str) and q.strip() and norm_text(q) not in seen:
            seen.add(norm_text(q))
            out.append(q.strip())
    return out[:k]


def clean_answer(text: str) -> tuple[str | None, str]:
    """Keep an in-character answer, or return the drop reason."""
    s = text.strip()
    if not s:
        return None, "empty"
    if any(b in s.lower() for b in _CHARACTER_BREAKS):
        return None, "breaks_character"
    return s, "ok"


# ---------------------------------------------------------------- stage

def _run_literary(cfg: RepurposeConfig, ctx, rows: list[dict], get_sampler) -> dict:
    files = read_text_inputs([ctx.resolve(p) for p in cfg.inputs], (".txt",))[: cfg.limit]
    items = []  # (key, chunk, meta, chunk_index, level)
    for f in files:
        meta, body = parse_work(f.read_text(encoding="utf-8"), f.stem)
        for ci, chunk in enumerate(chunk_text(body, cfg.chunk_words, cfg.min_chunk_words)):
            for lv in cfg.levels:
                items.append((record_id("lit", f.name, chunk, lv), chunk, {**meta, "file": f.name}, ci, lv))
    params = dataclasses.replace(cfg.sampling, n=cfg.instructions_per_level)
    outs = sample_step(ctx, get_sampler, "instructions", {k: literary_prompt(c, m, lv) for k, c, m, _, lv in items}, params,
                       cfg.chunk_size)
    drops: Counter = Counter()
    for item_key, chunk, meta, ci, lv in items:
        seen = set()
        for j, comp in enumerate(outs[item_key]):
            if cfg.require_stop and comp["finish"] != "stop":
                drops["truncated"] += 1
                continue
            ins, why = clean_instruction(comp["text"], chunk, cfg.max_instruction_words, cfg.leak_ngram)
            if ins is None or norm_text(ins) in seen:
                drops[why if ins is None else "duplicate"] += 1
                continue
            seen.add(norm_text(ins))
            rows.append(demonstration(
                [{"role": "user", "content": ins}, {"role": "assistant", "content": chunk}],
                id=record_id("repurpose-literary", item_key, j), source="repurpose:literary",
                meta={"work": meta["title"], "author": meta["author"], "file": meta["file"], "chunk": ci, "level": lv}))
    comps = [c for v in outs.values() for c in v]
    return {"works": len(files), "chunks": len({(m["file"], ci) for _, _, m, ci, _ in items}),
            "instructions_sampled": len(comps), "dropped": dict(drops),
            "_usable": (sum(bool(c["text"].strip()) for c in comps), len(comps), "instructions")}


def _run_roleplay(cfg: RepurposeConfig, ctx, rows: list[dict], get_sampler) -> dict:
    files = read_text_inputs([ctx.resolve(p) for p in cfg.inputs], (".json", ".txt"))[: cfg.limit]
    chars = [load_character(f) for f in files]
    qjobs, qmeta = {}, {}
    for ch in chars:
        for kind, k in (("grounded", cfg.grounded_queries), ("unknowable", cfg.unknowable_queries)):
            if k > 0:
                key = record_id("rp-q", ch, kind, k)
                qjobs[key] = query_prompt(ch, kind, k)
                qmeta[key] = (ch, kind, k)
    qparams = dataclasses.replace(cfg.sampling, n=1)
    qouts = sample_step(ctx, get_sampler, "queries", qjobs, qparams, cfg.chunk_size)
    drops: Counter = Counter()
    ajobs, ameta = {}, {}
    for key, comps in qouts.items():
        ch, kind, k = qmeta[key]
        comp = comps[0]
        qs = parse_queries(comp["text"], k) if (comp["finish"] == "stop" or not cfg.require_stop) else None
        if qs is None:
            drops["malformed_queries"] += 1
            continue
        for q in qs:
            akey = record_id("rp-a", ch["name"], kind, q)
            ajobs[akey] = answer_prompt(ch, kind, q)
            ameta[akey] = (ch, kind, q)
    aparams = dataclasses.replace(cfg.sampling, n=cfg.answers_per_query)
    aouts = sample_step(ctx, get_sampler, "answers", ajobs, aparams, cfg.chunk_size)
    cands = {}  # f"{akey}|{j}" -> cleaned answer
    for akey, comps in aouts.items():
        for j, comp in enumerate(comps):
            if cfg.require_stop and comp["finish"] != "stop":
                drops["truncated"] += 1
                continue
            ans, why = clean_answer(comp["text"])
            if ans is not None and any(cands.get(f"{akey}|{i}") == ans for i in range(j)):
                ans, why = None, "duplicate"
            if ans is None:
                drops[why] += 1
            else:
                cands[f"{akey}|{j}"] = ans
    if cfg.check_refusals:
        # The model confirms each answer does what its kind asks: grounded answers answer,
        # answers to unknowable premises decline. An unreadable verdict confirms nothing.
        jobs = {k: refusal_check_prompt(ameta[k.rsplit("|", 1)[0]][0], ameta[k.rsplit("|", 1)[0]][2], a) for k, a in cands.items()}
        verdicts = sample_step(ctx, get_sampler, "refusal_check", jobs, dataclasses.replace(cfg.judge_sampling, n=1),
                               cfg.chunk_size)
        for k in list(cands):
            v = extract_json(verdicts[k][0]["text"])
            declines = v.get("declines") if isinstance(v, dict) else None
            kind = ameta[k.rsplit("|", 1)[0]][1]
            if not isinstance(declines, bool):
                drops["check_unreadable"] += 1
                del cands[k]
            elif declines != (kind == "unknowable"):
                drops["refuses_grounded" if kind == "grounded" else "answers_unknowable"] += 1
                del cands[k]
    kinds: Counter = Counter()
    for k, ans in cands.items():
        akey, j = k.rsplit("|", 1)
        ch, kind, q = ameta[akey]
        # The demonstration keeps only the role (system) + query + answer: the
        # generation guidance must not leak into training data.
        msgs = [{"role": "system", "content": role_system(ch)}, {"role": "user", "content": q},
                {"role": "assistant", "content": ans}]
        rows.append(demonstration(msgs, id=record_id("repurpose-roleplay", akey, int(j)), source="repurpose:roleplay",
                                  meta={"character": ch["name"], "query_kind": kind}))
        kinds[kind] += 1
    return {"characters": len(chars), "query_prompts": len(qjobs), "queries": len(ajobs),
            "answers_sampled": sum(len(v) for v in aouts.values()), "kept_by_kind": dict(kinds), "dropped": dict(drops),
            "_usable": (len(qjobs) - drops["malformed_queries"], len(qjobs), "queries")}


def run(cfg: RepurposeConfig, ctx) -> dict:
    """Entry point of stage kind ``repurpose``."""
    rows: list[dict] = []
    stats = (_run_literary if cfg.mode == "literary" else _run_roleplay)(cfg, ctx, rows,
                                                                        lazy_sampler(ctx, cfg.sampler, cfg.model))
    ok, total, step = stats.pop("_usable")
    check_success(ctx.spec.name, "model outputs usable", ok, total, cfg.min_success_rate, [step_path(ctx, step)])
    rows = unique_ids(rows)
    write_records(ctx.out_dir / "records.jsonl", rows, "demonstration")
    stats["records"] = len(rows)
    stats["mode"] = cfg.mode
    ctx.write_json("stats.json", stats)
    return stats
