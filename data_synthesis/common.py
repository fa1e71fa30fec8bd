"""The common module of the synthesis stages: lenient JSON, instruction loading, resumable steps.

Input: model replies, instruction/problem records, a stage's output folder. Output:

* ``extract_json``: the first JSON value in a reply (fenced or bare; trailing commas, single
  quotes and Python literals tolerated) that a caller's ``want`` accepts, else None, so a
  malformed reply is counted, never fatal;
* ``load_instructions`` / ``instruction_text`` / ``build_prompt`` / ``get_field``: records in;
* resuming, the one way a synthesis stage resumes: every model call and sandbox run of a step
  is cached per item in ``OUT/steps/STEP.jsonl`` by ``StepCache`` (one line ``{"k": key, "v":
  value}`` per finished item). ``sample_step`` sends the missing prompts to the sampler
  ``chunk_size`` at a time and caches each chunk as soon as its call returns (a crash loses at
  most one chunk; a re-run sends only what is missing); every prompt carries its own seed,
  ``stable_seed(run seed, step, key, sampling.seed)``, so a resumed step gives the same
  completions as an uninterrupted one. ``map_step`` does the same for sandbox runs and other
  work. A chunk that raises is logged (step, chunk, what is committed) and the error goes up.
  Stages derive their records from the caches and write them whole at the end
  (``posttrain.core.records.write_records``: atomic), after ``check_success`` has refused a
  run whose usable-output rate fell below the stage's ``min_success_rate`` (``LowSuccessRate``,
  one line). A torn last cache line (kill mid-write) is cut away on open.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from posttrain.core.errors import BadInput
from posttrain.core.inputs import field_value
from posttrain.core.records import repair_jsonl, to_chat_prompt
from posttrain.core.sampling.base import Messages, Sampler, SamplerConfig, SamplingParams, stable_seed
from posttrain.core.text import fenced_blocks, norm_text

__all__ = ["CHUNK_DOC", "DEFAULT_CHUNK_SIZE", "FLOOR_DOC", "LowSuccessRate", "StepCache", "build_prompt",
           "check_success", "extract_json", "get_field", "instruction_text", "lazy_sampler", "load_instructions",
           "loads_lenient", "map_step", "norm_text", "read_text_inputs", "safe_step_name", "sample_step", "sampler_name", "step_path",
           "unique_ids"]

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


get_field = field_value  # ``rec["a"]["b"]`` for ``"a.b"``; None when any part is missing (one implementation)


def build_prompt(rec: dict, system_prompt: str | None, instruction: str) -> list[dict]:
    """The chat prompt of a problem record, with the optional system turn and instruction suffix."""
    msgs = [dict(m) for m in to_chat_prompt(rec)]
    if instruction and msgs and msgs[-1]["role"] == "user":
        msgs[-1]["content"] = msgs[-1]["content"].rstrip() + instruction
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


# ---------------------------------------------------------------- resumable steps

DEFAULT_CHUNK_SIZE = 256
CHUNK_DOC = ("prompts per sampler call; each call's results are cached as soon as it returns, so a crash "
             "loses at most one chunk (the resume granularity)")
FLOOR_DOC = ("fail, writing nothing, when fewer than this share of the model calls gave usable output "
             "(a dead server, a wrong chat template); 0 disables the check")


class LowSuccessRate(BadInput):
    """Too few model calls of a step gave usable output: the stage stops before writing anything."""


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
                raise BadInput(f"{self.path}:{n}: corrupt step cache line; move the file away to redo this step") from None

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        """The stored value of ``key`` (or ``default``)."""
        return self.data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (one line, flushed by ``flush``); a key already present is kept as is."""
        if key in self.data:
            return
        self._f.write(json.dumps({"k": key, "v": value}, ensure_ascii=False) + "\n")
        self.data[key] = value

    def flush(self) -> None:
        """Hand the written lines to the OS: they survive a kill of this process from here on."""
        self._f.flush()

    def close(self) -> None:
        """Flush and close the file."""
        if not self._f.closed:
            self._f.flush()
            self._f.close()

    def __enter__(self) -> "StepCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def step_path(ctx: Any, name: str) -> Path:
    """The cache file of step ``name`` of the running stage: ``OUT/steps/NAME.jsonl``."""
    return Path(ctx.out_dir) / "steps" / f"{name}.jsonl"


def safe_step_name(label: str) -> str:
    """A file-name-safe step name for a free-text label (e.g. a generator label), unique per label."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[:40] or "x"
    return slug if slug == label else f"{slug}-{hashlib.sha1(label.encode()).hexdigest()[:6]}"


def lazy_sampler(ctx: Any, cfg: SamplerConfig | None, model: str | None) -> Callable[[], Sampler]:
    """``get_sampler()`` that starts the stage's sampler on first use (a fully cached step starts no engine)."""
    got: list[Sampler] = []

    def get() -> Sampler:
        if not got:
            got.append(ctx.sampler(cfg, model))
        return got[0]

    return get


def sampler_name(ctx: Any, cfg: SamplerConfig | None) -> str:
    """The backend name a stage's records carry (``hf``, ``vllm``, ``openai``, or the injected sampler's), without
    starting an engine."""
    injected = getattr(getattr(ctx, "samplers", None), "injected", None)
    if injected is not None:
        return str(getattr(injected, "name", "injected"))
    return (cfg or ctx.recipe.file.sampler).backend


def _run_chunks(ctx: Any, name: str, keys: list[str], chunk_size: int, work: Callable[[list[str]], list[Any]],
                what: str) -> dict[str, Any]:
    """The chunk loop shared by ``sample_step`` and ``map_step``: cache, progress, logging, errors."""
    if chunk_size < 1:
        raise ValueError(f"step {name}: chunk_size must be >= 1, got {chunk_size}")
    with StepCache(step_path(ctx, name)) as cache:
        todo = [k for k in dict.fromkeys(keys) if k not in cache]
        total = len(set(keys))
        bar = ctx.progress(total=total, desc=f"{ctx.spec.name}:{name}", initial=total - len(todo))
        if todo:
            log.info("step %s: %d of %d items to %s (%d cached), %d per call", name, len(todo), total, what,
                     total - len(todo), chunk_size)
        n_chunks = (len(todo) + chunk_size - 1) // chunk_size
        for c, start in enumerate(range(0, len(todo), chunk_size), 1):
            chunk = todo[start: start + chunk_size]
            try:
                outs = work(chunk)
            except Exception as e:
                log.error("step %s: chunk %d/%d (%d items) failed: %s: %s; %d of %d items are committed in %s, "
                          "a re-run sends only the rest", name, c, n_chunks, len(chunk), type(e).__name__, e,
                          len(cache.data), total, cache.path)
                raise
            if len(outs) != len(chunk):
                raise RuntimeError(f"step {name}: got {len(outs)} results for {len(chunk)} items")
            for k, v in zip(chunk, outs):
                cache.put(k, v)
            cache.flush()  # committed: a crash from here on loses nothing of this chunk
            bar.update(len(chunk))
        bar.close()
        return {k: cache.get(k) for k in keys}


def sample_step(ctx: Any, get_sampler: Callable[[], Sampler], name: str, jobs: dict[str, Messages],
                params: SamplingParams, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, list[dict]]:
    """Sample ``params.n`` completions for every job not yet cached in ``steps/NAME.jsonl``.

    The missing prompts go to the sampler ``chunk_size`` at a time (one call per chunk, so the
    engine batches within it); each chunk's results ``[{"text", "finish", "n_tokens"}]`` are
    cached as soon as its call returns. Job ``k`` is sampled with the seed
    ``stable_seed(ctx.seed, name, k, params.seed)``: its completions are the same whatever chunk
    it lands in, so a resumed step gives what an uninterrupted one would. Returns ``key ->
    completions`` for all jobs. ``get_sampler`` is only called when something is left to sample.
    """
    def work(chunk: list[str]) -> list[list[dict]]:
        sampler = get_sampler()
        before = getattr(sampler, "retries", None)  # the openai backend counts its retried requests
        seeds = [stable_seed(ctx.seed, name, k, params.seed) for k in chunk]
        outs = sampler.generate([jobs[k] for k in chunk], params, seeds=seeds)
        after = getattr(sampler, "retries", None)
        if isinstance(before, int) and isinstance(after, int) and after > before:
            log.warning("step %s: %d requests of this chunk were retried", name, after - before)
        return [[{"text": c.text, "finish": c.finish_reason, "n_tokens": len(c.token_ids)} for c in comps]
                for comps in outs]

    return _run_chunks(ctx, name, list(jobs), chunk_size, work, "sample")


def map_step(ctx: Any, name: str, keys: list[str], fn: Callable[[list[str]], list[Any]],
             chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
    """Run ``fn(chunk_of_keys) -> [JSON value per key]`` for every key not cached in ``steps/NAME.jsonl``.

    For sandbox runs and other non-sampling work of a step: ``fn`` gets ``chunk_size`` keys at a
    time (so it can hand them to a process pool together) and each chunk is cached when it returns.
    """
    return _run_chunks(ctx, name, keys, chunk_size, fn, "run")


def check_success(stage: str, what: str, ok: int, total: int, floor: float, caches: Iterable[Path] = ()) -> None:
    """Raise ``LowSuccessRate`` when ``ok / total < floor`` (nothing to judge when ``total`` is 0)."""
    if total <= 0 or ok / total >= floor:
        return
    where = ", ".join(str(p) for p in caches)
    raise LowSuccessRate(f"stage {stage}: only {ok} of {total} {what} ({ok / total:.1%}) is below "
                         f"min_success_rate={floor:g}; nothing was written. Check the sampler (server, model, chat "
                         f"template) or lower min_success_rate"
                         + (f"; the model outputs are cached in {where}: delete them to sample again" if where else ""))


def unique_ids(rows: Iterable[dict]) -> list[dict]:
    """``rows`` without later records whose ``id`` repeats an earlier one (records derived from caches)."""
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


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
