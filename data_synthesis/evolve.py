"""Stage ``evolve``: rounds of instruction self-evolution into a ladder of difficulty levels.

Input: instruction records (e.g. stage ``select``'s ``records.jsonl``). The
text evolved is each record's last user message; its level is
``meta.evolve.level`` when present, else 0.

Method: in each of ``rounds`` rounds every instruction of the previous level
gets one operation (drawn per instruction and round from ``operations`` with
a seeded generator), and the model rewrites it. Operations:

* ``add_constraints``: add one or two constraints or requirements;
* ``deepen``: ask for more depth (reasons, trade-offs, edge cases);
* ``concretize``: replace general concepts with specific ones;
* ``increase_reasoning``: require several explicit reasoning steps;
* ``complicate_input``: add a concrete input (data, code, text) to work on.

Every output is cleaned (labels such as "Rewritten instruction:", wrapping
quotes or fences removed) and checked by ``check_evolution``: not empty,
changed (similarity to the parent below ``max_similarity``), not degenerate
(repetition, control characters or broken bytes, too few letters), within ``max_chars`` and ``max_growth`` times
the parent's length and not cut off by ``max_tokens``, and not leaking the
rewriting procedure ("rewritten prompt", "#Given Prompt#", the template's
delimiters...). Failures are counted by reason, recorded in ``failed.jsonl``
and dropped: their branch stops.

Outputs (written whole at the end): ``records.jsonl``: the level-0 inputs (when
``keep_original``) and every kept evolution, ``meta.evolve`` = ``{level, parent_id,
root_id, operation}``; ``failed.jsonl``; ``stats.json`` (per round and per operation:
attempted, kept, failures by reason). Each round's model calls are sampled in chunks
and cached per child id in ``steps/roundR.jsonl``, so a killed run resumes where it
stopped (kept and failed evolutions alike are never sampled again); fewer than
``min_success_rate`` non-empty outputs stop the stage before it writes anything.
"""

from __future__ import annotations

import difflib
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, check_success, instruction_text,
                                   lazy_sampler, load_instructions, sample_step, sampler_name)
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import record_id, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams

OPERATIONS: dict[str, str] = {
    "add_constraints": "Add one or two new constraints or requirements to it, for example on length, format, "
                       "style, audience, or what the answer must include or avoid.",
    "deepen": "Make it ask for more depth: reasons, trade-offs, limitations or edge cases that a thorough answer "
              "must cover.",
    "concretize": "Replace general concepts in it with more specific ones: concrete names, numbers, settings or "
                  "examples.",
    "increase_reasoning": "Change it so that answering it needs several explicit reasoning steps, not a single "
                          "recalled fact.",
    "complicate_input": "Add a short concrete input that the answer must work on, such as a small table, a list "
                        "of data, a code snippet or a passage of text.",
}

EVOLVE_PROMPT = """You make instructions for an AI assistant more demanding, one step at a time.
Rewrite the instruction below. {operation}
The new instruction must be self-contained, reasonable, and answerable by a person, and must add at most {words} words.
Do not answer it. Do not mention that it was rewritten or describe what you changed.
Reply with the new instruction only.

Instruction:
<<<
{instruction}
>>>"""

# Phrases that show the model talking about the rewriting instead of writing the instruction.
LEAK_PATTERNS = [r"#\s*(given|rewritten|created|new)\s*(prompt|instruction)\s*#", r"\brewritten (prompt|instruction|version)\b",
                 r"\b(given|original|above|previous|old) (prompt|instruction)\b", r"\bnew instruction\b",
                 r"<<<|>>>", r"\bhere is (the|a|my) (rewritten|new|revised|modified)\b",
                 r"\b(i|we) (have )?(added|rewrote|rewritten|changed|modified)\b", r"\bmore demanding\b",
                 r"\bself-contained\b", r"\bas an ai\b"]
_LABEL = re.compile(r"^\s*(#*\s*)?(rewritten|new|revised|evolved|modified)?\s*(prompt|instruction)\s*(#*)\s*[:：]\s*", re.I)


@dataclass
class EvolveConfig:
    """Keys of stage ``evolve`` (instruction self-evolution)."""

    input: InputSpec = key(doc="instruction records (e.g. @select)", input=True)
    rounds: int = key(3, "evolution rounds; round r makes difficulty level r")
    operations: list[str] = key(factory=lambda: list(OPERATIONS), doc="drawn per instruction and round")
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, max_tokens=512))
    max_added_words: int = key(40, "told to the model: at most this many new words per round")
    max_chars: int = key(4000, "an evolved instruction longer than this is dropped (too_long)")
    max_growth: float = key(3.0, "... and so is one longer than max_growth x parent length + 200 chars")
    min_chars: int = key(8, "shorter outputs are dropped (empty)")
    max_similarity: float = key(0.97, "difflib ratio to the parent at or above which it is \"unchanged\"")
    keep_original: bool = key(True, "also write the level-0 inputs into records.jsonl")
    limit: int | None = key(None, "evolve only the first N inputs")
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, CHUNK_DOC)
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: a non-empty output)")

    def check(self) -> None:
        """Cross-field checks."""
        bad = [o for o in self.operations if o not in OPERATIONS]
        if bad:
            raise ValueError(f"operations: unknown operation {bad[0]!r} (expected some of: {', '.join(OPERATIONS)})")
        if not self.operations or self.rounds < 1:
            raise ValueError("need at least one operation and rounds >= 1")
        if self.chunk_size < 1 or not 0 <= self.min_success_rate <= 1:
            raise ValueError("chunk_size must be >= 1 and min_success_rate in [0, 1]")


def evolve_prompt(instruction: str, operation: str, max_added_words: int = 40) -> list[dict]:
    """The chat prompt that asks for one evolution step of ``instruction``."""
    return [{"role": "user", "content": EVOLVE_PROMPT.format(operation=OPERATIONS[operation], words=max_added_words,
                                                             instruction=instruction)}]


def clean_output(text: str) -> str:
    """Strip labels ("Rewritten instruction:"), wrapping code fences, delimiters and quotes from an output."""
    t = (text or "").strip()
    m = re.fullmatch(r"```[A-Za-z]*\n(.*?)\n?```", t, re.S)
    if m:
        t = m.group(1).strip()
    t = _LABEL.sub("", t, count=1).strip()
    if t.startswith("<<<") and t.endswith(">>>"):
        t = t[3:-3].strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'“”" and t.count(t[0]) == 2:
        t = t[1:-1].strip()
    return t


def _degenerate(text: str) -> bool:
    ws = re.findall(r"\w+", text.lower())
    if re.search(r"(.)\1{15,}", text):  # one character repeated
        return True
    if "\ufffd" in text or re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text):  # broken bytes, control codes
        return True
    if re.search(r"\b(\w+)\b(?:\W+\1\b){4,}", text.lower()):  # one word five times in a row
        return True
    if len(ws) >= 12 and len(set(ws)) / len(ws) < 0.3:
        return True
    # mostly symbols or stray bytes rather than words and numbers
    alnum = sum(ch.isalnum() for ch in text)
    return alnum < 0.5 * len("".join(text.split())) or not ws


def check_evolution(parent: str, child: str, *, max_chars: int = 4000, max_growth: float = 3.0, min_chars: int = 8,
                    max_similarity: float = 0.97, truncated: bool = False) -> str | None:
    """Why an evolved instruction is rejected (``empty``, ``unchanged``, ``too_long``, ``degenerate``,
    ``leak``), or None when it passes. ``truncated``: the sampler hit max_tokens."""
    if len(child.strip()) < min_chars:
        return "empty"
    if truncated or len(child) > max_chars or len(child) > max_growth * len(parent) + 200:
        return "too_long"
    norm = lambda s: " ".join(re.findall(r"\w+", s.lower()))  # noqa: E731
    if norm(child) == norm(parent) or difflib.SequenceMatcher(None, parent, child).ratio() >= max_similarity:
        return "unchanged"
    if _degenerate(child):
        return "degenerate"
    low_parent, low_child = parent.lower(), child.lower()
    for pat in LEAK_PATTERNS:
        m = re.search(pat, low_child)
        if m and not re.search(pat, low_parent):  # the parent may legitimately talk about prompts
            return "leak"
    return None


def pick_operation(operations: list[str], seed: int, rec_id: str, level: int) -> str:
    """The operation for one instruction at one level (deterministic for the seed)."""
    return random.Random(f"{seed}:{rec_id}:{level}").choice(operations)


def run(cfg: EvolveConfig, ctx) -> dict:
    """Entry point of stage kind ``evolve``."""
    inputs = load_instructions(ctx.read_input(cfg.input, None), cfg.limit)
    stats: dict = {"inputs": len(inputs), "rounds": []}
    per_op: dict[str, Counter] = {op: Counter() for op in cfg.operations}
    base: list[dict] = []
    for rec in inputs:
        ev = dict(rec["meta"].get("evolve") or {})
        rec["meta"] = {**rec["meta"], "evolve": {"level": int(ev.get("level", 0)), "parent_id": ev.get("parent_id"),
                                                 "root_id": ev.get("root_id", rec["id"]),
                                                 "operation": ev.get("operation")}}
        base.append({**rec, "source": rec.get("source", "user")})
    kept: list[dict] = list(base) if cfg.keep_original else []
    failed: list[dict] = []
    source = f"evolve:{sampler_name(ctx, cfg.sampler)}"
    get_sampler = lazy_sampler(ctx, cfg.sampler, cfg.model)
    start = min((r["meta"]["evolve"]["level"] for r in base), default=0)
    frontier = base
    sampled = usable = 0
    for r in range(1, cfg.rounds + 1):
        jobs = {}
        for p in frontier:
            lvl = p["meta"]["evolve"]["level"] + 1
            op = pick_operation(cfg.operations, ctx.seed, p["id"], lvl)
            jobs[record_id("evolve", p["id"], lvl, op)] = (p, lvl, op)
        outs = sample_step(ctx, get_sampler, f"round{r}", {cid: evolve_prompt(instruction_text(p), op, cfg.max_added_words)
                                                          for cid, (p, _, op) in jobs.items()},
                           cfg.sampling, cfg.chunk_size)
        rs = Counter(attempted=len(jobs), kept=0, failed=0)
        frontier = []
        for cid, (p, lvl, op) in jobs.items():
            c = outs[cid][0]
            text = clean_output(c["text"])
            reason = check_evolution(instruction_text(p), text, max_chars=cfg.max_chars, max_growth=cfg.max_growth,
                                     min_chars=cfg.min_chars, max_similarity=cfg.max_similarity,
                                     truncated=c["finish"] == "length")
            sampled += 1
            usable += bool(c["text"].strip())
            info = {"level": lvl, "parent_id": p["id"], "root_id": p["meta"]["evolve"]["root_id"], "operation": op}
            per_op[op]["attempted"] += 1
            if reason is None:
                child = {"id": cid, "prompt": [{"role": "user", "content": text}], "source": source,
                         "meta": {"evolve": info}}
                kept.append(child)
                frontier.append(child)
                rs["kept"] += 1
                per_op[op]["kept"] += 1
            else:  # the branch stops here
                failed.append({"id": cid, "prompt": p["prompt"], "source": source,
                               "meta": {"evolve": info, "reason": reason, "output": c["text"][:1000]}})
                rs["failed"] += 1
                per_op[op]["failed"] += 1
        stats["rounds"].append({"round": r, "level": start + r, **rs})
    check_success(ctx.spec.name, "evolution outputs non-empty", usable, sampled, cfg.min_success_rate,
                  sorted((ctx.out_dir / "steps").glob("round*.jsonl")))
    write_records(ctx.out_dir / "records.jsonl", kept, "prompt")
    write_records(ctx.out_dir / "failed.jsonl", failed, "prompt")
    fails = Counter(f["meta"]["reason"] for f in failed)
    levels = Counter(x["meta"]["evolve"]["level"] for x in kept)
    stats.update({"records": len(kept), "per_level": {str(k): v for k, v in sorted(levels.items())},
                  "failed": len(failed), "failed_by_reason": dict(fails),
                  "per_operation": {k: {x: v[x] for x in ("attempted", "kept", "failed")}
                                    for k, v in per_op.items()}})
    ctx.write_json("stats.json", stats)
    return stats
