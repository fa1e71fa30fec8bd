"""Record schemas and dataset I/O shared by every stage and trainer.

Inputs: JSONL, Parquet or a `datasets` folder (``save_to_disk``) of records.
Outputs: the same formats. Two record kinds, in TRL's conversational formats:

* demonstration: ``{"id", "messages", "source", "meta"}``
* preference:    ``{"id", "prompt", "chosen", "rejected", "source", "meta"}``
  (``prompt`` is a message list ending with a user turn; ``chosen`` and
  ``rejected`` are lists of assistant messages; an optional float ``margin``
  is allowed for reward models.)

``RecordWriter`` appends JSONL so a killed stage resumes: rows are flushed one
line at a time, ids already in the file are skipped, and a torn last line left
by a crash is detected and cut away before appending.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROLES = {"system", "user", "assistant", "tool"}
DEMONSTRATION = "demonstration"
PREFERENCE = "preference"
PROMPT = "prompt"  # a bare prompt set: {"id", "prompt" | "messages", ...}


class RecordError(ValueError):
    """A record failed validation; the message names the file and line/row."""


def record_id(*parts: Any) -> str:
    """Deterministic short id from the parts (stable across runs and machines)."""
    h = hashlib.sha1(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def _check_messages(msgs: Any, where: str, field: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(f"{where}: '{field}' must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise RecordError(f"{where}: {field}[{i}].role must be one of {sorted(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"{where}: {field}[{i}].content must be a string")


def detect_kind(rec: dict) -> str:
    """Return the record kind of ``rec`` from its fields."""
    if "chosen" in rec or "rejected" in rec:
        return PREFERENCE
    if "messages" in rec:
        return DEMONSTRATION
    if "prompt" in rec:
        return PROMPT
    return "unknown"


def validate(rec: Any, kind: str | None = None, where: str = "<record>") -> dict:
    """Validate one record (and fill ``source``/``meta`` defaults); return it.

    ``kind`` is ``demonstration``, ``preference``, ``prompt`` or None (detect).
    Raises RecordError naming ``where`` (``file:line``) on bad input.
    """
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    for k in ("messages", "prompt", "chosen", "rejected", "margin"):
        if k in rec and rec[k] is None:  # columnar formats fill absent columns with nulls
            del rec[k]
    if isinstance(rec.get("meta"), str):  # columnar formats carry meta as a JSON string
        try:
            rec["meta"] = json.loads(rec["meta"])
        except json.JSONDecodeError:
            rec["meta"] = {"raw": rec["meta"]}
    kind = kind or detect_kind(rec)
    if kind == DEMONSTRATION:
        _check_messages(rec.get("messages"), where, "messages")
    elif kind == PREFERENCE:
        _check_messages(rec.get("prompt"), where, "prompt")
        _check_messages(rec.get("chosen"), where, "chosen")
        _check_messages(rec.get("rejected"), where, "rejected")
        if "margin" in rec and rec["margin"] is not None and not isinstance(rec["margin"], (int, float)):
            raise RecordError(f"{where}: 'margin' must be a number")
    elif kind == PROMPT:
        msgs = rec.get("prompt", rec.get("messages"))
        if isinstance(msgs, str):
            rec["prompt"] = [{"role": "user", "content": msgs}]
        else:
            _check_messages(msgs, where, "prompt")
            rec.setdefault("prompt", msgs)
    else:
        raise RecordError(f"{where}: not a {kind or 'known'} record (fields: {sorted(rec)})")
    if "id" not in rec or rec["id"] in (None, ""):
        rec["id"] = record_id(kind, {k: rec.get(k) for k in ("messages", "prompt", "chosen", "rejected")})
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

def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn = not data.endswith(b"\n") and data != b""
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw)
        except json.JSONDecodeError as e:
            if torn and n == len(lines):
                # A crash mid-write leaves the last line without its newline: drop it.
                return
            raise RecordError(f"{path}:{n}: invalid JSON ({e.msg})") from None


def iter_records(path: str | os.PathLike, kind: str | None = None) -> Iterator[dict]:
    """Yield validated records from a JSONL file, a Parquet file or a datasets folder."""
    p = Path(path)
    if not p.exists():
        raise RecordError(f"{p}: no such file or folder")
    if p.is_dir() and (p / "records.jsonl").exists():
        p = p / "records.jsonl"
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises many types
            raise RecordError(f"{p}: not a datasets folder ({e})") from None
        for i, row in enumerate(ds):
            yield validate(dict(row), kind, f"{p}:row {i}")
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield validate(row, kind, f"{p}:row {i}")
    else:
        for n, rec in _iter_jsonl(p):
            yield validate(rec, kind, f"{p}:{n}")


def check_input(path: str | os.PathLike, kind: str | None) -> int:
    """Validate every record of an input file as ``kind`` (what ``posttrain validate`` runs); return the count.

    Raises RecordError naming the file and row of the first bad record.
    """
    return sum(1 for _ in iter_records(path, kind))


def read_records(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Read all records of ``path`` (see ``iter_records``)."""
    return list(iter_records(path, kind))


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
    up to (excluding) its last assistant turn."""
    if "prompt" in rec and isinstance(rec["prompt"], list):
        return rec["prompt"]
    msgs = rec["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return msgs[:last]
