"""The common module of the synthesis stages: lenient JSON, instruction loading, resumable steps.

Input: model replies, instruction/problem records, a stage's output folder. Output:

* ``extract_json``: the first JSON value in a reply (fenced or bare; trailing commas, single
  quotes and Python literals tolerated) that a caller's ``want`` accepts, else None, so a
  malformed reply is counted, never fatal;
* ``load_instructions`` / ``instruction_text`` / ``build_prompt`` / ``get_field``: records in;
* resuming (the one way a synthesis stage resumes): every model call and sandbox run of a
  step is cached in ``OUT/steps/STEP.jsonl`` by ``StepCache``, one flushed line
  ``{"k": key, "v": value}`` per finished item; ``sample_step`` sends the missing prompts to the
  sampler chunk by chunk and caches each chunk as soon as it returns; a killed stage re-reads
  the caches and only redoes what is missing, and a torn last line (kill mid-write) is cut
  away on open. Stages derive their records from the caches and write them whole at the end.
  (``rejection_sampling`` and ``code_feedback`` still keep a per-problem commit log,
  ``problems.jsonl``, via ``open_outputs``: see their docstrings.)
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from posttrain.core.records import repair_jsonl, to_chat_prompt
from posttrain.core.sampling.base import Messages, Sampler, SamplingParams
from posttrain.core.text import fenced_blocks, norm_text

__all__ = ["StepCache", "build_prompt", "extract_json", "get_field", "instruction_text", "load_instructions",
           "loads_lenient", "norm_text", "open_outputs", "read_text_inputs", "sample_step"]

log = logging.getLogger("posttrain")


# ---------------------------------------------------------------- lenient JSON

def _balanced_fragments(s: str, limit: int = 8) -> Iterable[str]:
    """Yield substrings from each '[' or '{' to its matching bracket (quotes of both kinds respected)."""
    starts = [i for i, ch in enumerate(s) if ch in "[{"][: limit * 4]
    emitted = 0
    for start in starts:
        stack, quote, esc = [], None, False
        for j in range(start, len(s)):
            ch = s[j]
            if quote:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == quote and not (ch == "'" and s[j - 1].isalnum() and j + 1 < len(s) and s[j + 1].isalnum()):
                    quote = None
                continue
            if ch in "\"'":
                # an apostrophe inside a word ("user's") is not a quote
                if ch == "'" and j > 0 and s[j - 1].isalnum() and j + 1 < len(s) and s[j + 1].isalnum():
                    continue
                quote = ch
            elif ch in "[{":
                stack.append("]" if ch == "[" else "}")
            elif ch in "]}":
                if not stack or stack.pop() != ch:
                    break
                if not stack:
                    yield s[start: j + 1]
                    emitted += 1
                    break
        if emitted >= limit:
            return


def loads_lenient(fragment: str) -> Any:
    """Parse a JSON-ish fragment: strict JSON, then without trailing commas, then as a Python literal."""
    try:
        return json.loads(fragment)
    except json.JSONDecodeError:
        pass
    no_trailing = re.sub(r",\s*([\]}])", r"\1", fragment)
    try:
        return json.loads(no_trailing)
    except json.JSONDecodeError:
        pass
    try:  # single quotes, True/None: the model wrote a Python literal
        return ast.literal_eval(no_trailing)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:  # single-quoted strings holding apostrophes ('the user's code'): re-quote as JSON
        return json.loads(_requote(no_trailing))
    except json.JSONDecodeError:
        return None


def _requote(s: str) -> str:
    """Rewrite single-quoted strings as JSON strings; an apostrophe between letters stays literal."""
    out, i, n = [], 0, len(s)
    while i < n:
        ch = s[i]
        if ch == '"':  # copy a double-quoted string as is
            j = i + 1
            while j < n and s[j] != '"':
                j += 2 if s[j] == "\\" else 1
            out.append(s[i: j + 1])
            i = j + 1
        elif ch == "'":
            j, buf = i + 1, []
            while j < n:
                c = s[j]
                if c == "\\" and j + 1 < n:
                    buf.append(s[j + 1])
                    j += 2
                    continue
                if c == "'" and not (s[j - 1].isalnum() and j + 1 < n and s[j + 1].isalnum()):
                    break
                buf.append(c)
                j += 1
            out.append(json.dumps("".join(buf), ensure_ascii=False))
            i = j + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _any_container(obj: Any) -> Any:
    return obj if isinstance(obj, (dict, list)) else None


def extract_json(text: str | None, want: Callable[[Any], Any] | None = None) -> Any:
    """First value in ``text`` (fenced blocks first, then anywhere) for which ``want(obj)`` is not None.

    ``want`` defaults to "any JSON object or array". Models wrap JSON in prose or ```json fences
    and write trailing commas or single quotes; a reply with nothing acceptable gives None so the
    caller can count it as malformed rather than crash.
    """
    if not isinstance(text, str):
        return None
    want = want or _any_container
    candidates = [body for _, body in fenced_blocks(text, allow_open=True)] + [text]
    for c in candidates:
        for frag in _balanced_fragments(c):
            obj = loads_lenient(frag)
            if obj is None:
                continue
            got = want(obj)
            if got is not None:
                return got
    return None


# ---------------------------------------------------------------- records in

def instruction_text(rec: dict) -> str:
    """The instruction of a record: its last user message (before any assistant answer)."""
    msgs = to_chat_prompt(rec)
    users = [m["content"] for m in msgs if m["role"] == "user"]
    return users[-1] if users else msgs[-1]["content"]


def load_instructions(records: Iterable[dict], limit: int | None = None) -> list[dict]:
    """Instruction items ``{id, prompt, source, meta}`` of records (prompt or demonstration), first ``limit``.

    Duplicates by id are dropped.
    """
    out, seen = [], set()
    for rec in records:
        if rec["id"] in seen:
            continue
        seen.add(rec["id"])
        out.append({"id": rec["id"], "prompt": to_chat_prompt(rec), "source": rec.get("source", "user"),
                    "meta": rec.get("meta") or {}})
        if limit is not None and len(out) >= limit:
            break
    return out


def get_field(rec: dict, dotted: str) -> Any:
    """``rec["a"]["b"]`` for ``"a.b"``; None when any part is missing."""
    node: Any = rec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def drop_uncommitted(paths: list[Path], committed: set[str]) -> int:
    """Remove records whose ``meta.problem_id`` is not committed (a problem interrupted half-way).

    Rewrites each file atomically; returns how many records were dropped.
    """
    dropped = 0
    for p in paths:
        if not p.exists():
            continue
        keep, n = [], 0
        for line in p.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                n += 1  # a torn last line
                continue
            if (rec.get("meta") or {}).get("problem_id") in committed:
                keep.append(line)
            else:
                n += 1
        if n:
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_bytes(b"".join(x + b"\n" for x in keep))
            os.replace(tmp, p)
            dropped += n
    return dropped


def open_outputs(out: Path) -> tuple[Path, Path, Path, set[str]]:
    """A per-problem stage's output paths (log, demonstrations, preferences) and its committed problem ids.

    Records of problems that were interrupted half-way (not in the log) are dropped, so they are redone whole.
    """
    log_path = out / "problems.jsonl"
    demo_path, pref_path = out / "demonstrations.jsonl", out / "preferences.jsonl"
    done = committed_ids(log_path)
    dropped = drop_uncommitted([demo_path, pref_path], done)
    if dropped:
        log.info("resume: dropped %d records of problems that were interrupted half-way", dropped)
    return log_path, demo_path, pref_path, done


def committed_ids(log_path: Path) -> set[str]:
    """Ids of problems whose commit line is in ``problems.jsonl`` (a torn last line does not count)."""
    if not log_path.exists():
        return set()
    ids = set()
    for line in log_path.read_bytes().split(b"\n"):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def build_prompt(rec: dict, system_prompt: str | None, instruction: str) -> list[dict]:
    """The chat prompt of a problem record, with the optional system turn and instruction suffix."""
    msgs = [dict(m) for m in to_chat_prompt(rec)]
    if instruction and msgs and msgs[-1]["role"] == "user":
        msgs[-1]["content"] = msgs[-1]["content"].rstrip() + instruction
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs



# ---------------------------------------------------------------- resumable steps

class StepCache:
    """Append-only JSONL mapping ``key -> value`` for one step of a stage (see module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {}
        if self.path.exists():
            self._load()
        self._f = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        raw = repair_jsonl(self.path)  # a torn last line's item is simply redone
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.data[str(row["k"])] = row["v"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{self.path}:{n}: corrupt step cache line; move the file away to redo this step") from None

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        """The stored value of ``key`` (or ``default``)."""
        return self.data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (one flushed line); a key already present is kept as is."""
        if key in self.data:
            return
        self._f.write(json.dumps({"k": key, "v": value}, ensure_ascii=False) + "\n")
        self._f.flush()
        self.data[key] = value

    def close(self) -> None:
        """Flush and close the file."""
        if not self._f.closed:
            self._f.flush()
            self._f.close()

    def __enter__(self) -> "StepCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sample_step(ctx: Any, get_sampler: Callable[[], Sampler], name: str, jobs: dict[str, Messages],
                params: SamplingParams) -> dict[str, list[dict]]:
    """Sample ``params.n`` completions for every job not yet cached in ``steps/NAME.jsonl``.

    All missing prompts go to the sampler in ONE call (so the engine batches);
    each result ``[{"text", "finish"}]`` is cached as soon as the call returns.
    Returns ``key -> completions`` for all jobs. ``get_sampler`` is only called
    when something is left to sample, so a fully resumed step starts no engine.
    """
    with StepCache(ctx.out_dir / "steps" / f"{name}.jsonl") as cache:
        todo = [k for k in jobs if k not in cache]
        bar = ctx.progress(total=len(jobs), desc=f"{ctx.spec.name}:{name}", initial=len(jobs) - len(todo))
        if todo:
            outs = get_sampler().generate([jobs[k] for k in todo], params)
            if len(outs) != len(todo):
                raise RuntimeError(f"step {name}: sampler returned {len(outs)} results for {len(todo)} prompts")
            for k, comps in zip(todo, outs):
                cache.put(k, [{"text": c.text, "finish": c.finish_reason} for c in comps])
                bar.update(1)
        bar.close()
        return {k: cache.get(k) for k in jobs}


def read_text_inputs(paths: Iterable[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Expand files and folders (sorted, non-recursive) into the files with one of ``suffixes``."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix in suffixes))
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return out
