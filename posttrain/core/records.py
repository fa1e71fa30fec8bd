"""Record schemas, reading any supported layout, auditing, and writing records.

Inputs: JSONL, JSON, Parquet, a ``datasets`` folder (``Dataset`` or ``DatasetDict``) or a hub
dataset (``hf://ORG/NAME``) in any layout ``posttrain.core.layouts`` reads (every TRL dataset
type, ShareGPT, Alpaca). Outputs: canonical records, in TRL's conversational formats:

* demonstration: ``{"id", "messages", "source", "meta"}``, or ``{"id", "text", "source", "meta"}``
  for language-modelling text (trained on every token, without a chat template: sft only)
* preference:    ``{"id", "prompt", "chosen", "rejected", "source", "meta"}``
  (``prompt`` is a message list ending with a user turn; ``chosen`` and
  ``rejected`` are lists of assistant messages; an optional float ``margin``
  is allowed for reward models.)
* prompt:        ``{"id", "prompt", "source", "meta", ...}`` (extra fields are kept)

``iter_records`` reads and normalises (``check_input`` also audits: what ``posttrain validate``
runs on every input). ``RecordAudit`` counts the rows that are well-formed but unusable
(chosen == rejected, a completion that is not an assistant turn, a demonstration with no
assistant turn, one id with two contents) and fails when their share is above a limit.

``RecordWriter`` appends JSONL so a killed stage resumes: rows are flushed one
line at a time, ids already in the file are skipped, and a torn last line left
by a crash is detected and cut away before appending.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from posttrain.core.datafiles import MB, iter_rows
from posttrain.core.errors import RecordError
from posttrain.core.layouts import (
    DEMONSTRATION,
    PREFERENCE,
    PROMPT,
    ROLES,
    coerce_messages,
    normalise,
    prompt_of_messages,
)

__all__ = ["DEMONSTRATION", "PREFERENCE", "PROMPT", "ROLES", "RecordAudit", "RecordError", "RecordWriter",
           "check_input", "demonstration", "detect_kind", "iter_records", "preference", "read_records", "record_id",
           "repair_jsonl", "to_chat_prompt", "validate", "write_records"]

DEFAULT_MAX_LINE_BYTES = 16 * MB
DEFAULT_MAX_FLAGGED_SHARE = 0.1


def record_id(*parts: Any) -> str:
    """Deterministic short id from the parts (stable across runs and machines)."""
    h = hashlib.sha1(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def detect_kind(rec: dict) -> str:
    """Return the record kind of a canonical ``rec`` from its fields."""
    if "chosen" in rec or "rejected" in rec:
        return PREFERENCE
    if "messages" in rec or ("text" in rec and "prompt" not in rec):
        return DEMONSTRATION
    if "prompt" in rec:
        return PROMPT
    return "unknown"


def validate(rec: Any, kind: str | None = None, where: str = "<record>") -> dict:
    """Check one canonical record (and fill ``id``/``source``/``meta`` defaults); return it.

    ``kind`` is ``demonstration``, ``preference``, ``prompt`` or None (detect). Messages are
    normalised as ``layouts.coerce_messages`` does; a prompt record given a conversation takes
    the turns before its last assistant turn. Raises RecordError naming ``where`` (``file:line``).
    Foreign layouts are read by ``iter_records`` (``layouts.normalise``), not here.
    """
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    for k in ("messages", "prompt", "chosen", "rejected", "margin", "text"):
        if k in rec and rec[k] is None:  # columnar formats fill absent columns with nulls
            del rec[k]
    if isinstance(rec.get("meta"), str):  # columnar formats carry meta as a JSON string
        try:
            rec["meta"] = json.loads(rec["meta"])
        except json.JSONDecodeError:
            rec["meta"] = {"raw": rec["meta"]}
    kind = kind or detect_kind(rec)
    if kind == DEMONSTRATION:
        if "messages" not in rec and isinstance(rec.get("text"), str):
            if not rec["text"].strip():
                raise RecordError(f"{where}: 'text' must be a non-empty string")
        else:
            rec["messages"] = coerce_messages(rec.get("messages"), where, "messages")
    elif kind == PREFERENCE:
        for f in ("prompt", "chosen", "rejected"):
            rec[f] = coerce_messages(rec.get(f), where, f)
        if "margin" in rec and (isinstance(rec["margin"], bool) or not isinstance(rec["margin"], (int, float))):
            raise RecordError(f"{where}: 'margin' must be a number")
    elif kind == PROMPT:
        msgs = rec.get("prompt")
        if isinstance(msgs, str):
            rec["prompt"] = [{"role": "user", "content": msgs}]
        elif msgs is not None:
            rec["prompt"] = coerce_messages(msgs, where, "prompt")
        elif "messages" in rec:
            rec["prompt"] = prompt_of_messages(coerce_messages(rec["messages"], where, "messages"), where)
        else:
            raise RecordError(f"{where}: a prompt record needs 'prompt' (or 'messages'), fields: {sorted(rec)}")
    else:
        raise RecordError(f"{where}: not a {kind or 'known'} record (fields: {sorted(rec)})")
    if "id" not in rec or rec["id"] in (None, ""):
        content = {k: rec.get(k) for k in ("messages", "prompt", "chosen", "rejected")}  # the ids of earlier versions
        if "text" in rec and "messages" not in rec:
            content["text"] = rec["text"]
        rec["id"] = record_id(kind, content)
    rec["id"] = str(rec["id"])
    rec.setdefault("source", "user")
    meta = rec.setdefault("meta", {})
    if meta is None:
        rec["meta"] = {}
    elif not isinstance(meta, dict):
        raise RecordError(f"{where}: 'meta' must be an object")
    return rec


def demonstration(messages: list[dict], *, source: str, meta: dict | None = None, id: str | None = None) -> dict:
    """Build a validated demonstration record."""
    rec = {"id": id or record_id("demo", messages), "messages": messages, "source": source, "meta": meta or {}}
    return validate(rec, DEMONSTRATION)


def preference(prompt: list[dict], chosen: str | list[dict], rejected: str | list[dict], *, source: str,
               meta: dict | None = None, id: str | None = None, margin: float | None = None) -> dict:
    """Build a validated preference record; string responses become one assistant turn."""
    c = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
    r = [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else rejected
    rec = {"id": id or record_id("pref", prompt, c, r), "prompt": prompt, "chosen": c, "rejected": r,
           "source": source, "meta": meta or {}}
    if margin is not None:
        rec["margin"] = float(margin)
    return validate(rec, PREFERENCE)


# ---------------------------------------------------------------- reading

def _size(rec: dict) -> int:
    """Characters of text a record carries (a bound for formats without lines, e.g. Parquet cells)."""
    n = len(rec["text"]) if isinstance(rec.get("text"), str) else 0
    for f in ("messages", "prompt", "chosen", "rejected"):
        if isinstance(rec.get(f), list):
            n += sum(len(m.get("content") or "") for m in rec[f])
    return n


def iter_located(path: str | os.PathLike, kind: str | None = None, split: str | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` pairs of ``iter_records`` (``where`` names the file and line/row)."""
    for where, row in iter_rows(path, split, max_line_bytes):
        k, rec = normalise(row, kind, where)
        rec = validate(rec, k, where)
        if _size(rec) > max_line_bytes:
            raise RecordError(f"{where}: the record holds more than {max_line_bytes / MB:.3g} MB of text (the limit "
                              "is data.max_line_mb); split or shorten it")
        yield where, rec


def iter_records(path: str | os.PathLike, kind: str | None = None, split: str | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[dict]:
    """Yield canonical records of ``kind`` from any supported file, folder or hub dataset, in order.

    Each row is normalised from its layout (``layouts.normalise``) and validated; the first bad
    row raises RecordError naming the file and line/row. ``split`` picks a ``DatasetDict`` split;
    ``max_line_bytes`` bounds a JSONL line (and the text of one row of any format).
    """
    for _, rec in iter_located(path, kind, split, max_line_bytes):
        yield rec


def _messages_key(msgs: list[dict]) -> list[tuple[Any, Any]]:
    return [(m.get("role"), m.get("content")) for m in msgs]


class RecordAudit:
    """Counts records that are well-formed but unusable, and fails above a share of them.

    Checks (``check(rec, where)`` returns the names a record fails): ``no_assistant_turn``
    (a demonstration conversation without an assistant turn; kind demonstration only),
    ``chosen_equals_rejected`` and ``completion_not_assistant`` (a chosen/rejected list that does
    not start with an assistant turn or holds a user/system turn; kind preference only), and
    ``conflicting_id`` (an id seen before with different content; an exact repeat is only counted
    as ``repeated_rows``). ``DROPPED`` are the checks whose records a stage input leaves out; the
    others reach the trainers, which skip and count them in their own statistics.
    """

    DROPPED = ("completion_not_assistant", "conflicting_id")

    def __init__(self, kind: str | None, label: str):
        self.kind, self.label = kind, label
        self.rows = 0
        self.flagged = 0
        self.counts: Counter[str] = Counter()
        self.first: tuple[str, str] | None = None
        self._seen: dict[str, str] = {}

    def check(self, rec: dict, where: str) -> set[str]:
        """The checks ``rec`` fails (and count it)."""
        self.rows += 1
        flags: set[str] = set()
        if self.kind == DEMONSTRATION and "messages" in rec \
                and not any(m["role"] == "assistant" for m in rec["messages"]):
            flags.add("no_assistant_turn")
        if self.kind == PREFERENCE:
            if _messages_key(rec["chosen"]) == _messages_key(rec["rejected"]):
                flags.add("chosen_equals_rejected")
            turns = rec["chosen"] + rec["rejected"]
            if rec["chosen"][0]["role"] != "assistant" or rec["rejected"][0]["role"] != "assistant" \
                    or any(m["role"] in ("user", "system") for m in turns):
                flags.add("completion_not_assistant")
        content = json.dumps([rec.get(k) for k in ("messages", "text", "prompt", "chosen", "rejected")],
                             sort_keys=True, ensure_ascii=False, default=str)
        digest = hashlib.sha1(content.encode()).hexdigest()
        prev = self._seen.get(rec["id"])
        if prev is None:
            self._seen[rec["id"]] = digest
        elif prev != digest:
            flags.add("conflicting_id")
        else:
            self.counts["repeated_rows"] += 1  # an exact repeat is legal (e.g. a weighted copy): only counted
        for f in flags:
            self.counts[f] += 1
        if flags:
            self.flagged += 1
            if self.first is None:
                self.first = (where, min(flags))
        return flags

    def stats(self) -> dict:
        """``{rows, flagged, <check>: count, ...}`` for the stage's data statistics."""
        return {"rows": self.rows, "flagged": self.flagged, **dict(sorted(self.counts.items()))}

    def enforce(self, max_share: float) -> None:
        """Raise RecordError (one line) when more than ``max_share`` of the rows were flagged."""
        if self.rows and self.flagged / self.rows > max_share:
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()) if k != "repeated_rows")
            where, flag = self.first or ("?", "?")
            raise RecordError(f"{self.label}: {self.flagged} of {self.rows} rows are unusable ({counts}; first: "
                              f"{where}: {flag}), more than data.max_flagged_share={max_share:g} of them: fix the "
                              "data or raise that limit")


def check_input(path: str | os.PathLike, kind: str | None, split: str | None = None, *,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                max_flagged_share: float = DEFAULT_MAX_FLAGGED_SHARE) -> int:
    """Read, normalise and audit every record of an input as ``kind`` (what ``posttrain validate`` runs).

    Returns the record count. Raises RecordError naming the file and row of the first bad record,
    for an input with no records, or when the audit's share of unusable rows is above the limit.
    """
    audit = RecordAudit(kind, str(path))
    for where, rec in iter_located(path, kind, split, max_line_bytes):
        audit.check(rec, where)
    if audit.rows == 0:
        raise RecordError(f"{path}: no records (the input is empty or only blank lines)")
    audit.enforce(max_flagged_share)
    return audit.rows


def read_records(path: str | os.PathLike, kind: str | None = None, split: str | None = None) -> list[dict]:
    """Read all records of ``path`` (see ``iter_records``)."""
    return list(iter_records(path, kind, split))


def write_records(path: str | os.PathLike, records: Iterable[dict], kind: str | None = None) -> int:
    """Write ``records`` atomically to JSONL, Parquet (``.parquet``) or a datasets folder (no suffix)."""
    p = Path(path)
    rows = [validate(dict(r), kind, f"{p}:row {i}") for i, r in enumerate(records)]
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    if p.suffix == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, p)
    elif p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(_jsonable_meta(rows)), tmp)
        os.replace(tmp, p)
    else:
        import datasets

        datasets.Dataset.from_list(_jsonable_meta(rows)).save_to_disk(str(p))
    return len(rows)


def _jsonable_meta(rows: list[dict]) -> list[dict]:
    # Arrow needs one schema for all rows; free-form meta dicts rarely share one,
    # so meta travels as a JSON string in columnar formats and is decoded on read.
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    out = []
    for r in rows:
        r = {k: r.get(k) for k in keys}  # arrow infers the schema from the first row
        r["meta"] = json.dumps(r.get("meta") or {}, ensure_ascii=False)
        out.append(r)
    return out


# ---------------------------------------------------------------- writing

def repair_jsonl(path: str | os.PathLike) -> bytes:
    """Cut a torn last line (no trailing newline: a kill mid-write) off a JSONL file; return the rest."""
    p = Path(path)
    data = p.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(p, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return data


class RecordWriter:
    """Append-safe, id-idempotent JSONL writer for a stage's output.

    Opening an existing file reads the ids it holds (so a resumed stage can ask
    ``writer.has(id)`` and skip finished work), truncates a torn last line, and
    appends. Every ``write`` is one ``write(2)`` of a full line followed by a
    flush, so a kill leaves at most one torn line, which the next open removes.
    """

    def __init__(self, path: str | os.PathLike, kind: str | None = None):
        self.path = Path(path)
        self.kind = kind
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ids: set[str] = set()
        if self.path.exists():
            self._repair_and_load()
        self._f = open(self.path, "a", encoding="utf-8")
        self.written = 0

    def _repair_and_load(self) -> None:
        data = repair_jsonl(self.path)
        for n, raw in enumerate(data.split(b"\n"), 1):
            if raw.strip():
                try:
                    self.ids.add(str(json.loads(raw)["id"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise RecordError(f"{self.path}:{n}: corrupt record in an existing output; "
                                      "move the file away to start over") from None

    def has(self, rid: str) -> bool:
        """True when a record with this id is already in the file."""
        return str(rid) in self.ids

    def write(self, rec: dict) -> bool:
        """Validate and append ``rec`` unless its id is present; return True if written."""
        rec = validate(dict(rec), self.kind, f"{self.path}:new row")
        if rec["id"] in self.ids:
            return False
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        self.ids.add(rec["id"])
        self.written += 1
        return True

    def write_many(self, recs: Iterable[dict]) -> int:
        """Append several records; return how many were new."""
        return sum(self.write(r) for r in recs)

    def close(self) -> None:
        """Flush to disk and close."""
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def to_chat_prompt(rec: dict) -> list[dict]:
    """The prompt messages of any record: preference/prompt ``prompt``, or a demonstration
    up to (excluding) its last assistant turn. A ``text`` record has none: RecordError."""
    if "prompt" in rec and isinstance(rec["prompt"], list):
        return rec["prompt"]
    if "messages" not in rec:
        raise RecordError(f"record {rec.get('id')}: a language-modelling row ('text') has no prompt; this stage "
                          "needs prompts, conversations or preference pairs")
    msgs = rec["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return msgs[:last]
