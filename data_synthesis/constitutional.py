"""Stage ``constitutional``: demonstrations and preferences from a constitution (Qwen2 report 4.1.2).

Input: a constitution YAML (``name``; ``follow`` and ``avoid``: lists of
``{id, text}`` principles, ids unique) and a prompt set (records with a
``prompt`` or ``messages``). Two modes (key ``mode``):

* ``contrast`` (default): per prompt the model writes one response that
  follows the constitution and one that violates a named principle (drawn
  per prompt, reproducibly, from ``violate`` or from all principles).
* ``revise``: the model answers plainly; a response that the check finds in
  breach is critiqued against the broken principles and revised (Bai et al.
  2022, critique-and-revise).

Check: the model, shown the whole constitution, lists the ids a response
breaks as JSON ``{"violated": [...]}`` (``judge_votes`` samples, majority
vote; replies with no valid vote drop the item). Confirmed followers (no
violation) become demonstrations; a confirmed follower paired with a
confirmed violator (contrast: the named principle is among the violated
ones; revise: the original breached something the revision fixed) becomes a
preference. Every record's ``meta`` carries the principle ids involved.

Output: ``OUT/demonstrations.jsonl``, ``OUT/preferences.jsonl`` (written whole at the
end), ``stats.json`` (counts per step), ``steps/*.jsonl`` (cached model calls).
Resumable: model calls are sampled ``chunk_size`` at a time and cached per item as each
call returns; the records are derived from the caches. Fewer than ``min_success_rate``
readable verdicts stop the stage before it writes anything.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, check_success, extract_json, lazy_sampler,
                                   sample_step, step_path, unique_ids)
from posttrain.core.config import load_yaml
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import demonstration, preference, record_id, to_chat_prompt, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams


@dataclass
class ConstitutionalConfig:
    """Keys of stage ``constitutional``."""

    constitution: str = key(doc="YAML: name, follow: [{id, text}], avoid: [{id, text}]", input=True)
    prompts: InputSpec = key(doc="prompt records (JSONL/Parquet/datasets; 'prompt' or 'messages')", input=True)
    mode: Literal["contrast", "revise"] = key("contrast", "follower+violator per prompt, or critique-and-revise")
    violate: list[str] | None = key(None, "principle ids a violator may target (default: all)")
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.8, max_tokens=256, seed=0))
    judge_sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=128, seed=0))
    judge_votes: int = key(1, "check samples per response; a principle counts as broken on a strict majority")
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    require_stop: bool = key(True, "drop responses cut by max_tokens")
    limit: int | None = key(None, "use only the first N prompts")
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, CHUNK_DOC)
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: a check with a readable verdict)")

    def check(self) -> None:
        """Cross-field checks."""
        if self.judge_votes < 1 or self.chunk_size < 1:
            raise ValueError("judge_votes and chunk_size must be >= 1")
        if not 0 <= self.min_success_rate <= 1:
            raise ValueError("min_success_rate must be in [0, 1]")


@dataclass
class Principle:
    """One principle: ``kind`` is ``follow`` (do this) or ``avoid`` (never do this)."""

    id: str
    kind: str
    text: str


def load_constitution(path: str | Path) -> tuple[str, list[Principle]]:
    """Read and validate a constitution YAML; errors are one line naming the file and key."""
    p = Path(path)
    data = load_yaml(p.read_text(encoding="utf-8"), str(p))
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a constitution is a mapping with 'follow' and/or 'avoid' lists")
    unknown = set(data) - {"name", "description", "follow", "avoid"}
    if unknown:
        raise ValueError(f"{p}: {sorted(unknown)[0]}: unknown key (expected name, description, follow, avoid)")
    out: list[Principle] = []
    seen: set[str] = set()
    for kind in ("follow", "avoid"):
        items = data.get(kind) or []
        if not isinstance(items, list):
            raise ValueError(f"{p}: {kind}: expected a list of {{id, text}}")
        for i, it in enumerate(items):
            where = f"{p}: {kind}[{i}]"
            if not isinstance(it, dict) or set(it) != {"id", "text"}:
                raise ValueError(f"{where}: expected exactly the keys 'id' and 'text'")
            if not isinstance(it["id"], str) or not it["id"].strip() or not isinstance(it["text"], str) or not it["text"].strip():
                raise ValueError(f"{where}: 'id' and 'text' must be non-empty strings")
            if it["id"] in seen:
                raise ValueError(f"{where}.id: duplicate principle id {it['id']!r}")
            seen.add(it["id"])
            out.append(Principle(it["id"], kind, it["text"].strip()))
    if not out:
        raise ValueError(f"{p}: the constitution has no principles")
    return str(data.get("name") or p.stem), out


def render_constitution(principles: list[Principle]) -> str:
    """The principles as a compact list with ids, for prompts."""
    lines = ["Principles to follow:"] + [f"- [{q.id}] {q.text}" for q in principles if q.kind == "follow"]
    lines += ["Principles to avoid (never do these):"] + [f"- [{q.id}] {q.text}" for q in principles if q.kind == "avoid"]
    return "\n".join(lines)


def follower_prompt(prompt: list[dict], principles: list[Principle]) -> list[dict]:
    """Generation prompt for a response that follows the whole constitution."""
    sys = "You are a helpful assistant. Your reply must respect these principles.\n" + render_constitution(principles)
    return [{"role": "system", "content": sys}] + [m for m in prompt if m["role"] != "system"]


def violator_prompt(prompt: list[dict], target: Principle) -> list[dict]:
    """Generation prompt for a response that breaks ``target`` (a negative example for preference data)."""
    how = (f"does NOT follow this principle: {target.text}" if target.kind == "follow"
           else f"does exactly what this principle forbids: {target.text}")
    sys = ("You are writing a negative example for a training set. Reply to the user with a response that "
           f"{how} Otherwise answer naturally, and do not mention any principle.")
    return [{"role": "system", "content": sys}] + [m for m in prompt if m["role"] != "system"]


def _transcript(prompt: list[dict]) -> str:
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt if m["role"] != "system")


def judge_prompt(prompt: list[dict], response: str, principles: list[Principle]) -> list[dict]:
    """Ask which principle ids a response breaks, as JSON ``{"violated": [ids]}``."""
    return [{"role": "user", "content": (
        f"{render_constitution(principles)}\n\nConversation:\n{_transcript(prompt)}\n\nRESPONSE TO CHECK:\n{response}\n\n"
        "Which principles does the response break? A 'follow' principle is broken when the response fails to "
        "do it; an 'avoid' principle is broken when the response does it. Reply with JSON only: "
        '{"violated": [ids]} (an empty list when it breaks none).')}]


def revise_prompt(prompt: list[dict], response: str, broken: list[Principle], principles: list[Principle]) -> list[dict]:
    """Critique-and-revise prompt: name the broken principles, ask for a critique and a rewrite as JSON."""
    names = "; ".join(f"[{q.id}] {q.text}" for q in broken)
    return [{"role": "user", "content": (
        f"{render_constitution(principles)}\n\nConversation:\n{_transcript(prompt)}\n\nRESPONSE:\n{response}\n\n"
        f"This response breaks: {names}. First critique it against these principles, then rewrite it so it "
        'respects every principle while still helping the user. Reply with JSON only: {"critique": "...", "revision": "..."}')}]


def parse_verdicts(texts: list[str], ids: set[str]) -> list[str] | None:
    """Majority vote over judge replies: the ids listed by more than half of the valid votes.

    A valid vote is a JSON object whose ``violated`` is a list (unknown ids are
    ignored). Returns None when no reply is a valid vote (the item is dropped:
    an unreadable check confirms nothing).
    """
    votes = []
    for t in texts:
        d = extract_json(t)
        if isinstance(d, dict) and isinstance(d.get("violated"), list):
            votes.append({str(x) for x in d["violated"] if str(x) in ids})
    if not votes:
        return None
    counts = Counter(x for v in votes for x in v)
    return sorted(x for x, c in counts.items() if c * 2 > len(votes))


def parse_revision(text: str) -> tuple[str, str] | None:
    """``(critique, revision)`` from a critique-and-revise reply, or None when malformed."""
    d = extract_json(text)
    if isinstance(d, dict) and isinstance(d.get("revision"), str) and d["revision"].strip():
        return str(d.get("critique", "")).strip(), d["revision"].strip()
    return None


def pick_target(pid: str, candidates: list[Principle], seed: int) -> Principle:
    """The principle the violator of prompt ``pid`` must break: reproducible per (seed, prompt id)."""
    return candidates[int(record_id(seed, pid), 16) % len(candidates)]


def _ok(comp: dict, require_stop: bool) -> bool:
    return bool(comp["text"].strip()) and (comp["finish"] == "stop" or not require_stop)


def run(cfg: ConstitutionalConfig, ctx) -> dict:
    """Entry point of stage kind ``constitutional``."""
    name, principles = load_constitution(ctx.resolve(cfg.constitution))
    ids = {q.id for q in principles}
    by_id = {q.id: q for q in principles}
    if cfg.violate is not None:
        bad = [v for v in cfg.violate if v not in ids]
        if bad:
            raise ValueError(f"violate: unknown principle id(s) {bad} (constitution has: {', '.join(sorted(ids))})")
    targets = [by_id[v] for v in cfg.violate] if cfg.violate else principles
    rows = ctx.read_input(cfg.prompts, None, cfg.limit)
    prompts = {str(r["id"]): to_chat_prompt(r) for r in rows}
    get_sampler = lazy_sampler(ctx, cfg.sampler, cfg.model)

    gen = dataclasses.replace(cfg.sampling, n=1)
    judge = dataclasses.replace(cfg.judge_sampling, n=cfg.judge_votes)
    stats: Counter = Counter()
    src = f"constitutional:{cfg.mode}"
    all_ids = sorted(ids)

    def check(step: str, items: dict[str, tuple[list[dict], str]]) -> dict[str, list[str] | None]:
        outs = sample_step(ctx, get_sampler, step, {k: judge_prompt(p, r, principles) for k, (p, r) in items.items()},
                           judge, cfg.chunk_size)
        res = {k: parse_verdicts([c["text"] for c in v], ids) for k, v in outs.items()}
        stats[f"{step}_malformed"] += sum(v is None for v in res.values())
        checked[0] += len(res)
        checked[1] += sum(v is not None for v in res.values())
        caches.append(step_path(ctx, step))
        return res

    checked, caches = [0, 0], []
    demos: list[dict] = []
    prefs: list[dict] = []
    if cfg.mode == "contrast":
        stats.update({"followers_confirmed": 0, "violators_confirmed": 0})
        jobs, tgt = {}, {}
        for pid, p in prompts.items():
            t = pick_target(pid, targets, ctx.seed)
            tgt[pid] = t
            jobs[f"{pid}|follow"] = follower_prompt(p, principles)
            jobs[f"{pid}|violate|{t.id}"] = violator_prompt(p, t)
        outs = sample_step(ctx, get_sampler, "responses", jobs, gen, cfg.chunk_size)
        good = {k: v[0]["text"].strip() for k, v in outs.items() if _ok(v[0], cfg.require_stop)}
        stats["responses"] = len(outs)
        stats["responses_dropped"] = len(outs) - len(good)
        verdicts = check("check", {k: (prompts[k.split("|")[0]], r) for k, r in good.items()})
        for pid, p in prompts.items():
            fk, vk = f"{pid}|follow", f"{pid}|violate|{tgt[pid].id}"
            fv, vv = verdicts.get(fk), verdicts.get(vk)
            if fv == []:
                stats["followers_confirmed"] += 1
                demos.append(demonstration(p + [{"role": "assistant", "content": good[fk]}], source=src,
                                           id=record_id("const-demo", name, pid, good[fk]),
                                           meta={"constitution": name, "principle_ids": all_ids, "prompt_id": pid}))
            if vv is not None and tgt[pid].id in vv:
                stats["violators_confirmed"] += 1
                if fv == []:
                    prefs.append(preference(p, good[fk], good[vk], source=src, id=record_id("const-pref", name, pid, good[fk], good[vk]),
                                            meta={"constitution": name, "violated_principle": tgt[pid].id,
                                                  "rejected_violates": vv, "principle_ids": all_ids, "prompt_id": pid}))
    else:
        stats.update({"initial_clean": 0, "revise_malformed": 0, "revisions_confirmed": 0})
        outs = sample_step(ctx, get_sampler, "initial", {pid: [m for m in p] for pid, p in prompts.items()}, gen,
                           cfg.chunk_size)
        initial = {k: v[0]["text"].strip() for k, v in outs.items() if _ok(v[0], cfg.require_stop)}
        stats["responses"] = len(outs)
        stats["responses_dropped"] = len(outs) - len(initial)
        v0 = check("check_initial", {k: (prompts[k], r) for k, r in initial.items()})
        breached = {k: v for k, v in v0.items() if v}
        for pid, v in v0.items():
            if v == []:
                stats["initial_clean"] += 1
                demos.append(demonstration(prompts[pid] + [{"role": "assistant", "content": initial[pid]}], source=src,
                                           id=record_id("const-demo", name, pid, initial[pid]),
                                           meta={"constitution": name, "principle_ids": all_ids, "prompt_id": pid}))
        stats["initial_breached"] = len(breached)
        routs = sample_step(ctx, get_sampler, "revise", {
            pid: revise_prompt(prompts[pid], initial[pid], [by_id[i] for i in v], principles)
            for pid, v in breached.items()}, gen, cfg.chunk_size)
        revised = {}
        for pid, v in routs.items():
            r = parse_revision(v[0]["text"]) if _ok(v[0], cfg.require_stop) else None
            if r is None:
                stats["revise_malformed"] += 1
            else:
                revised[pid] = r
        v1 = check("check_revision", {k: (prompts[k], rev) for k, (_, rev) in revised.items()})
        for pid, v in v1.items():
            if v != []:
                continue
            stats["revisions_confirmed"] += 1
            critique, rev = revised[pid]
            p = prompts[pid]
            demos.append(demonstration(p + [{"role": "assistant", "content": rev}], source=src,
                                       id=record_id("const-demo", name, pid, rev),
                                       meta={"constitution": name, "principle_ids": all_ids, "prompt_id": pid, "revised": True}))
            prefs.append(preference(p, rev, initial[pid], source=src, id=record_id("const-pref", name, pid, rev, initial[pid]),
                                    meta={"constitution": name, "violated_principle": breached[pid][0],
                                          "rejected_violates": breached[pid], "principle_ids": all_ids,
                                          "critique": critique, "prompt_id": pid}))
    check_success(ctx.spec.name, "checks with a readable verdict", checked[1], checked[0], cfg.min_success_rate, caches)
    demos, prefs = unique_ids(demos), unique_ids(prefs)
    write_records(ctx.out_dir / "demonstrations.jsonl", demos, "demonstration")
    write_records(ctx.out_dir / "preferences.jsonl", prefs, "preference")
    out = {"mode": cfg.mode, "constitution": name, "prompts": len(prompts), **stats,
           "demonstrations": len(demos), "preferences": len(prefs)}
    ctx.write_json("stats.json", out)
    return out
