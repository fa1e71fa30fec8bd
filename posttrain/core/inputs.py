"""A stage's data input: one file/folder, or a mixture of several sources.

Input: the value of a stage's ``input`` key: a path (JSONL, JSON, Parquet, a ``datasets`` folder,
``hf://ORG/NAME``, or an ``@stage`` reference), or a list of ``Source`` sections (path, weight
or row count, ``where`` filter, split); the record kind the stage wants; the stage seed; an
optional ``limit``; the checks (``DataSection``). Output: ``read_input`` -> the normalised records
plus stats (per source: rows read, filtered out, unusable rows by check, rows taken, repeats;
realised shares), deterministic under the seed.

Mixture semantics:

* a source with neither ``weight`` nor ``rows`` gives all its rows (after ``where``);
* ``rows: N`` gives exactly N rows: a seeded sample without replacement, or, when N is more
  than the source has, every row ``N // n`` times plus a seeded sample of the remainder (the
  only way a row repeats; copies get the id ``ID~rK`` so id-keyed steps keep them apart);
* weighted sources share the rest in the proportions ``weight / sum(weights)``, never repeating a
  row: their total is the largest size at which every weighted source has enough rows
  (``min(available_i / share_i)``), capped by ``limit`` minus the rows of the other sources.
  Counts are rounded by largest remainder so they add up to that total. So weights are
  proportions of the mixture, not of a fixed target size; to repeat a scarce source, give it
  ``rows``;
* the mixture is shuffled with the seed (a single path keeps its file order), and ``limit``
  cuts it when the fixed sources alone exceed it.

Each source is read, normalised and audited on its own (``RecordAudit``): rows failing the
checks in ``RecordAudit.DROPPED`` are left out; more than ``data.max_flagged_share`` unusable
rows in a source is an error naming the source and its first bad row; an empty source is an error.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.core.config import key
from posttrain.core.datafiles import MB
from posttrain.core.errors import RecordError
from posttrain.core.records import (
    DEFAULT_MAX_FLAGGED_SHARE,
    DEFAULT_MAX_LINE_BYTES,
    RecordAudit,
    check_input,
    iter_located,
)


@dataclass
class DataSection:
    """Limits on a stage's input data (``stages[i].data.*``)."""

    max_line_mb: float = key(DEFAULT_MAX_LINE_BYTES / MB, "a JSONL line (or one row's text) longer than this is an "
                             "error, before it reaches the tokenizer")
    max_flagged_share: float = key(DEFAULT_MAX_FLAGGED_SHARE, "error when more than this share of a source's rows "
                                   "is unusable (chosen == rejected, a completion that is not an assistant turn, no "
                                   "assistant turn, one id with two contents); 1 never fails")

    def check(self) -> None:
        """Ranges."""
        if self.max_line_mb <= 0:
            raise ValueError("max_line_mb must be > 0")
        if not 0 <= self.max_flagged_share <= 1:
            raise ValueError("max_flagged_share must be in [0, 1]")

    @property
    def max_line_bytes(self) -> int:
        """``max_line_mb`` in bytes."""
        return round(self.max_line_mb * MB)


@dataclass
class Source:
    """One source of a mixture (``input: [{path: ..., weight: ...}, ...]``)."""

    path: str = key(doc="records file or folder, hf://ORG/NAME[:CONFIG], or @stage reference", input=True)
    weight: float | None = key(None, "share of the weighted part of the mixture (weights are normalised over the "
                               "weighted sources; rows are never repeated)")
    rows: int | None = key(None, "take exactly this many rows (a seeded sample; more than the source has repeats it)")
    where: dict[str, Any] = key(factory=dict, doc="keep rows whose `source` / `meta.KEY` (dotted) equal these "
                                "values (a list value: any of them)")
    split: str | None = key(None, "split of a DatasetDict folder or hub dataset (null: train, or its only split)")

    def check(self) -> None:
        """A source is weighted or counted, not both."""
        if self.weight is not None and self.rows is not None:
            raise ValueError("give a source either weight or rows, not both")
        if self.weight is not None and self.weight <= 0:
            raise ValueError("weight must be > 0")
        if self.rows is not None and self.rows < 0:
            raise ValueError("rows must be >= 0")
        for k in self.where:
            if k != "source" and not (k.startswith("meta.") and len(k) > 5) and k != "id":
                raise ValueError(f"where: {k!r}: filter on 'id', 'source' or 'meta.KEY'")


InputSpec = str | list[Source]


@dataclass
class PreferenceInputs:
    """The inputs of a stage that trains on preference pairs (dpo, reward); their keys come first."""

    input: InputSpec = key(doc="preference records (file, folder, mixture or @stage)", input="preference")
    data: DataSection = key(factory=DataSection, doc="checks on the input rows: line size, share of unusable rows")
    eval_input: InputSpec | None = key(None, "held-out preference records; unset: split eval_fraction off input",
                                       input="preference")
    eval_fraction: float = key(0.0, "without eval_input: hold out this fraction of input (seeded) for evaluation")

    def check_inputs(self) -> None:
        """The held-out share is a fraction that leaves training rows."""
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")


def input_label(spec: InputSpec) -> str:
    """How messages name an input: its path, or the paths of a mixture."""
    return spec if isinstance(spec, str) else "mixture[" + ", ".join(s.path for s in spec) + "]"


# ---------------------------------------------------------------- filters and counts

def field_value(rec: dict, dotted: str) -> Any:
    """``rec["a"]["b"]`` for ``"a.b"``; None when a part is missing."""
    node: Any = rec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def matches(rec: dict, where: dict[str, Any]) -> bool:
    """True when every ``where`` field equals its value (or one of a list of values)."""
    for k, want in where.items():
        got = field_value(rec, k)
        if isinstance(want, list) and not isinstance(got, list):
            if got not in want:
                return False
        elif got != want:
            return False
    return True


def largest_remainder(total: int, shares: list[float]) -> list[int]:
    """Integer counts adding up to ``total`` in the given proportions (largest-remainder rounding)."""
    s = sum(shares)
    exact = [total * w / s for w in shares]
    counts = [int(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _sample(rows: list[dict], n: int, rng: random.Random) -> tuple[list[dict], int]:
    """``n`` rows of ``rows`` (seeded; repeats only when ``n > len(rows)``) and the number of repeats."""
    if n <= len(rows):
        return rng.sample(rows, n), 0
    if not rows:
        return [], 0
    whole, rest = divmod(n, len(rows))
    out = []
    for k in range(whole):
        out += rows if k == 0 else [{**r, "id": f"{r['id']}~r{k}"} for r in rows]
    out += [{**r, "id": f"{r['id']}~r{whole}"} for r in rng.sample(rows, rest)]
    return out, n - len(rows)


# ---------------------------------------------------------------- reading

def _read_source(label: str, path: str, kind: str | None, split: str | None, where: dict[str, Any],
                 data: DataSection, limit: int | None = None) -> tuple[list[dict], dict]:
    """One source's usable records (filtered, audited) and its stats."""
    audit = RecordAudit(kind, label)
    recs: list[dict] = []
    read = filtered = dropped = 0
    for loc, rec in iter_located(path, kind, split, data.max_line_bytes):
        read += 1
        if where and not matches(rec, where):
            filtered += 1
            continue
        if audit.check(rec, loc) & set(RecordAudit.DROPPED):
            dropped += 1
            continue
        recs.append(rec)
        if limit is not None and len(recs) >= limit:
            break
    if read == 0:
        raise RecordError(f"{label}: no records (the input is empty or only blank lines)")
    if where and not recs and not dropped:
        raise RecordError(f"{label}: none of {read} rows matches where={where}")
    audit.enforce(data.max_flagged_share)
    st = {"path": path, "read": read, "available": len(recs), "dropped": dropped, "checks": audit.stats()}
    if where:
        st["filtered_out"] = filtered
    if split:
        st["split"] = split
    return recs, st


def read_input(spec: InputSpec, kind: str | None, resolve: Callable[[str], str], seed: int = 0,
               limit: int | None = None, data: DataSection | None = None) -> tuple[list[dict], dict]:
    """Records of ``spec`` (normalised to ``kind``, audited) and stats of what was read (module docstring)."""
    data = data or DataSection()
    if isinstance(spec, str):
        recs, st = _read_source(spec, resolve(spec), kind, None, {}, data, limit)
        return recs, {"sources": {spec: st}, "rows": len(recs)}
    if not spec:
        raise RecordError("input: an empty list of sources")
    parts: list[list[dict]] = []
    stats: dict[str, dict] = {}
    labels = [f"input[{i}] {src.path}" for i, src in enumerate(spec)]
    for i, src in enumerate(spec):
        label = labels[i]
        recs, st = _read_source(label, resolve(src.path), kind, src.split, src.where, data)
        st["weight"] = src.weight
        st["rows_asked"] = src.rows
        parts.append(recs)
        stats[label] = st
    fixed = [i for i, s in enumerate(spec) if s.weight is None]
    weighted = [i for i, s in enumerate(spec) if s.weight is not None]
    taken: dict[int, list[dict]] = {}
    for i in fixed:
        rng = random.Random(f"{seed}:{i}:{spec[i].path}")
        if spec[i].rows is None:
            taken[i], repeats = parts[i], 0
        else:
            taken[i], repeats = _sample(parts[i], spec[i].rows, rng)
        stats[labels[i]]["repeated"] = repeats
    if weighted:
        weights = [spec[i].weight for i in weighted]
        total_w = sum(weights)
        if any(not parts[i] for i in weighted):
            empty = next(i for i in weighted if not parts[i])
            raise RecordError(f"input[{empty}] {spec[empty].path}: no usable rows for a weighted source")
        cap = min(len(parts[i]) * total_w / w for i, w in zip(weighted, weights))
        size = int(cap + 1e-9)
        if limit is not None:
            size = max(0, min(size, limit - sum(len(taken[i]) for i in fixed)))
        for i, n in zip(weighted, largest_remainder(size, weights)):
            rng = random.Random(f"{seed}:{i}:{spec[i].path}")
            taken[i], _ = _sample(parts[i], min(n, len(parts[i])), rng)  # min: float rounding never repeats
            stats[labels[i]]["repeated"] = 0
    tagged = [(i, r) for i in range(len(spec)) for r in taken[i]]
    random.Random(f"{seed}:mixture").shuffle(tagged)
    if limit is not None:
        tagged = tagged[:limit]
    counts = Counter(i for i, _ in tagged)
    for i, label in enumerate(stats):
        stats[label]["taken"] = counts.get(i, 0)
        stats[label]["share"] = round(counts.get(i, 0) / len(tagged), 6) if tagged else 0.0
    return [r for _, r in tagged], {"sources": stats, "rows": len(tagged), "seed": seed, "limit": limit}


def check_source(path: str, kind: str | None, src: Source | None = None, data: DataSection | None = None) -> int:
    """What ``posttrain validate`` should run on one input path (or mixture source); returns the row count."""
    data = data or DataSection()
    return check_input(path, kind, src.split if src else None, max_line_bytes=data.max_line_bytes,
                       max_flagged_share=data.max_flagged_share)
