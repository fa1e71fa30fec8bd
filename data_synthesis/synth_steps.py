"""Shared plumbing for multi-step synthesis stages: resumable step caches, batched sampling, JSON parsing.

Used by ``repurpose``, ``constitutional`` and ``if_feedback``. Input: a stage's
output folder and the prompts of one step. Output: ``steps/STEP.jsonl`` files,
one line ``{"k": key, "v": value}`` per finished item, appended and flushed as
each item completes. A killed stage re-reads them and only redoes items that
are missing, so no model call or sandbox run is repeated or lost. A torn last
line (kill mid-write) is cut away on open, as ``RecordWriter`` does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from posttrain.records import repair_jsonl
from posttrain.sampling.base import Messages, Sampler, SamplingParams


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


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """The first JSON object or array in a model reply (fenced or bare), or None when there is none.

    Models wrap JSON in prose or ```json fences; a reply that is not valid JSON
    anywhere (truncated, single quotes, trailing commas...) gives None so the
    caller can count it as malformed rather than crash.
    """
    if not isinstance(text, str):
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    dec = json.JSONDecoder()
    for cand in candidates:
        s = cand.strip()
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            pass
        for i, ch in enumerate(s):
            if ch in "{[":
                try:
                    return dec.raw_decode(s, i)[0]
                except json.JSONDecodeError:
                    continue
    return None


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


def norm_text(s: str) -> str:
    """Lower-cased, whitespace-collapsed text, for de-duplication."""
    return re.sub(r"\s+", " ", s.strip().lower())
