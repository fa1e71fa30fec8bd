"""The annotation database: tasks, annotators (token hashes) and submissions, in one SQLite file.

Input: annotation tasks (the ``tasks.jsonl`` of stage ``respond``: ``{"id", "prompt": [messages],
"responses": [{"id", "text", ...}, ...]}``, at least two responses each), annotator names, and
submissions (a JSON object per ranking) from the server. Output: the SQLite file (WAL mode), which
alone is enough for export.

Identity: ``add_annotator`` issues a random token and stores only its SHA-256; every submission
is stored with the name its token maps to, so no one can write under another annotator's name.
Every submission is kept (one INSERT each, committed before the reply); an annotator's latest
submission of a task is the one that counts, and another annotator's rankings are never touched.
A submission may carry a ``nonce`` (the page sends one per task): a retry with the same nonce
returns the stored submission instead of adding a second row.

Blindness: the page never sees response ids (which may name their generator); each annotator
gets per-task opaque keys (``blind_key``) in a per-annotator shuffled order, mapped back here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.core.errors import BadInput, RecordError
from posttrain.core.records import iter_records, record_id

MAX_TEXT = 500_000  # characters of an edited response or comment; a ranking itself is tiny
SUBMISSION_KEYS = frozenset({"task_id", "ranking", "best_id", "edited", "comment", "nonce"})
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, position INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL REFERENCES tasks(id),
    annotator TEXT NOT NULL,
    created REAL NOT NULL,
    ranking TEXT NOT NULL,
    best_id TEXT NOT NULL,
    edited TEXT,
    comment TEXT
);
CREATE INDEX IF NOT EXISTS submissions_task ON submissions(task_id, annotator);
"""


class SubmissionError(ValueError):
    """A submission is malformed or does not fit its task; the message is one line for the client."""


@dataclass(frozen=True)
class Submission:
    """A submission whose shape was checked (types and sizes), not yet matched against its task."""

    task_id: str
    ranking: dict[str, int]  # blind key -> rank (1 = best)
    best_id: str | None
    edited: str | None
    comment: str | None
    nonce: str | None


# ---------------------------------------------------------------- tasks

def load_tasks(path: str | os.PathLike) -> list[dict]:
    """Read and check annotation tasks (a file or a folder with ``tasks.jsonl``); a bad task raises
    RecordError naming the file and record."""
    p = Path(path)
    if p.is_dir() and (p / "tasks.jsonl").exists():
        p = p / "tasks.jsonl"
    tasks, seen = [], set()
    try:
        records = list(iter_records(p, "prompt"))
    except ValueError as e:  # records.py raises its own ValueError subclass; the CLI prints BadInput
        if isinstance(e, BadInput):
            raise
        raise RecordError(str(e)) from None
    for n, rec in enumerate(records, 1):
        where = f"{p}: record {n} (id {rec['id']})"
        resps = rec.get("responses")
        if not isinstance(resps, list) or len(resps) < 2:
            raise RecordError(f"{where}: 'responses' must be a list of at least 2 responses")
        ids = set()
        for j, r in enumerate(resps):
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise RecordError(f"{where}: responses[{j}] must be an object with a string 'text'")
            r.setdefault("id", record_id(rec["id"], j))
            if str(r["id"]) in ids:
                raise RecordError(f"{where}: responses[{j}].id {r['id']!r} is repeated")
            r["id"] = str(r["id"])
            ids.add(r["id"])
        if rec["id"] in seen:
            raise RecordError(f"{where}: task id repeated")
        seen.add(rec["id"])
        tasks.append(rec)
    if not tasks:
        raise RecordError(f"{p}: no tasks")
    return tasks


def blind_key(task_id: str, annotator: str, response_id: str) -> str:
    """The opaque key under which ``annotator`` sees ``response_id`` of ``task_id``."""
    return hashlib.sha256(f"{task_id}\0{annotator}\0{response_id}".encode()).hexdigest()[:16]


def token_hash(token: str) -> str:
    """SHA-256 of a token: tokens are 192 random bits, so a plain hash is enough to store them safely."""
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------- submissions: shape checks

def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _opt_str(body: dict, name: str, limit: int) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise SubmissionError(f"{name}: expected a string or null, got {type(v).__name__}")
    if v is not None and len(v) > limit:
        raise SubmissionError(f"{name}: longer than {limit} characters")
    return v


def parse_submission(body: Any) -> Submission:
    """Check the shape of a decoded submission body; raise SubmissionError with a one-line reason."""
    if not isinstance(body, dict):
        raise SubmissionError(f"body: expected a JSON object, got {type(body).__name__}")
    if "annotator" in body:
        raise SubmissionError("annotator: your identity comes from your token; do not send a name")
    unknown = sorted(set(body) - SUBMISSION_KEYS)
    if unknown:
        raise SubmissionError(f"body: unknown key {_short(unknown[0])} (expected {', '.join(sorted(SUBMISSION_KEYS))})")
    task_id = body.get("task_id")
    if not isinstance(task_id, str) or not task_id or len(task_id) > 1000:
        raise SubmissionError(f"task_id: expected a task id string, got {_short(task_id)}")
    ranking = body.get("ranking")
    if not isinstance(ranking, dict) or not ranking:
        raise SubmissionError(f"ranking: expected an object {{response: rank}}, got {type(ranking).__name__}")
    if len(ranking) > 1000:
        raise SubmissionError("ranking: too many responses")
    for k, v in ranking.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise SubmissionError(f"ranking[{_short(k)}]: rank must be a whole number, got {_short(v)}")
    best = body.get("best_id")
    if best is not None and not isinstance(best, str):
        raise SubmissionError(f"best_id: expected a response key string or null, got {type(best).__name__}")
    nonce = _opt_str(body, "nonce", 100)
    if nonce == "":
        raise SubmissionError("nonce: must not be empty")
    return Submission(task_id, dict(ranking), best, _opt_str(body, "edited", MAX_TEXT),
                      _opt_str(body, "comment", MAX_TEXT), nonce)


def resolve_submission(task: dict, annotator: str, sub: Submission) -> tuple[dict[str, int], str, str | None]:
    """Match a shaped submission against its task: map blind keys back to response ids and check ranks.

    Returns (ranks by response id, best response id, edited text or None); raises SubmissionError.
    """
    ids = {blind_key(task["id"], annotator, r["id"]): r["id"] for r in task["responses"]}
    if set(sub.ranking) != set(ids):
        raise SubmissionError(f"ranking: give a rank to every response of task {_short(task['id'])}, and only to those")
    n = len(ids)
    if not all(1 <= v <= n for v in sub.ranking.values()):
        raise SubmissionError(f"ranking: ranks must be whole numbers from 1 to {n}")
    ranks = {ids[k]: v for k, v in sub.ranking.items()}
    top = min(ranks.values())
    order = [r["id"] for r in task["responses"]]
    if sub.best_id is None:
        best = next(i for i in order if ranks[i] == top)
    elif sub.best_id not in ids or ranks[ids[sub.best_id]] != top:
        raise SubmissionError("best_id: must be one of the top-ranked responses")
    else:
        best = ids[sub.best_id]
    edited = sub.edited
    original = next(r["text"] for r in task["responses"] if r["id"] == best)
    if edited is not None and (edited == original or not edited.strip()):
        edited = None  # an untouched (or emptied) edit box is not an edit
    return ranks, best, edited


# ---------------------------------------------------------------- the database

def connect(db: str | os.PathLike, init: bool = True) -> sqlite3.Connection:
    """Open the annotations database (autocommit, waits up to 30 s for a busy writer, fsync on commit);
    ``init`` creates missing tables, switches the file to WAL and upgrades databases of older versions."""
    conn = sqlite3.connect(str(db), timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA synchronous=FULL")  # a reply means the row is on disk
    if init:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
        conn.executescript(SCHEMA)
        cols = {row[1] for row in conn.execute("PRAGMA table_info(submissions)")}
        if "nonce" not in cols:  # databases written before nonces existed
            conn.execute("ALTER TABLE submissions ADD COLUMN nonce TEXT")
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS submissions_nonce ON submissions(annotator, nonce) "
                     "WHERE nonce IS NOT NULL")
    return conn


class Store:
    """All reads and writes of one annotations database, safe to call from many threads.

    Each call opens its own connection (sqlite3 connections are not shared across threads);
    writes of this process go through one lock, so concurrent submissions queue here instead of
    spinning in SQLite's busy handler, and other processes are still serialised by SQLite.
    """

    def __init__(self, db: str | os.PathLike):
        self.path = str(db)
        self._write = threading.Lock()
        try:
            with self._conn(init=True):
                pass
        except sqlite3.DatabaseError as e:  # not SQLite, a missing folder, no permission
            raise BadInput(f"{db}: cannot open as an annotations database ({e})") from None

    @contextlib.contextmanager
    def _conn(self, init: bool = False) -> Iterator[sqlite3.Connection]:
        conn = connect(self.path, init=init)
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write, self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # tasks
    def import_tasks(self, tasks: list[dict]) -> int:
        """Copy tasks into the database (existing ids are kept as they are); return how many were new."""
        with self._transaction() as conn:
            before = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            conn.executemany("INSERT OR IGNORE INTO tasks (id, position, data) VALUES (?, ?, ?)",
                             [(t["id"], before + i, json.dumps(t, ensure_ascii=False)) for i, t in enumerate(tasks)])
            return conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] - before

    def task_count(self) -> int:
        """How many tasks the database holds."""
        with self._conn() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])

    # annotators
    def add_annotator(self, name: str, rotate: bool = False) -> str:
        """Register ``name`` (or, with ``rotate``, replace its token) and return the new token.

        Only the token's hash is stored, so the token is shown once, here. Raises BadInput for a bad
        or already registered name (without ``rotate``) or an unknown one (with ``rotate``).
        """
        name = name.strip() if isinstance(name, str) else ""
        if not name or len(name) > 100 or not name.isprintable():
            raise BadInput(f"annotator name {_short(name)}: give 1-100 printable characters")
        token = secrets.token_urlsafe(24)
        with self._transaction() as conn:
            known = conn.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone() is not None
            if known and not rotate:
                raise BadInput(f"{self.path}: annotator {name!r} already exists (--rotate issues a new token)")
            if rotate and not known:
                raise BadInput(f"{self.path}: no annotator {name!r} to rotate (leave out --rotate to add one)")
            conn.execute("INSERT INTO annotators (name, token_hash, created) VALUES (?, ?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET token_hash = excluded.token_hash, created = excluded.created",
                         (name, token_hash(token), time.time()))
        return token

    def annotator_for(self, token: str | None) -> str | None:
        """The annotator a token belongs to, or None."""
        if not token or len(token) > 200:
            return None
        with self._conn() as conn:
            row = conn.execute("SELECT name FROM annotators WHERE token_hash = ?", (token_hash(token),)).fetchone()
        return row[0] if row else None

    def annotators(self) -> list[str]:
        """Names of the registered annotators."""
        with self._conn() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM annotators ORDER BY name")]

    # submissions
    def submit(self, annotator: str, body: Any) -> tuple[int, bool]:
        """Store one submission of ``annotator`` (the decoded JSON body); return (row id, was a retry).

        Raises SubmissionError with a one-line reason for anything malformed.
        """
        sub = parse_submission(body)
        with self._transaction() as conn:
            row = conn.execute("SELECT data FROM tasks WHERE id = ?", (sub.task_id,)).fetchone()
            if row is None:
                raise SubmissionError(f"task_id: no task {_short(sub.task_id)}")
            ranks, best, edited = resolve_submission(json.loads(row[0]), annotator, sub)
            if sub.nonce is not None:
                seen = conn.execute("SELECT id, task_id FROM submissions WHERE annotator = ? AND nonce = ?",
                                    (annotator, sub.nonce)).fetchone()
                if seen is not None:
                    if seen[1] != sub.task_id:
                        raise SubmissionError(f"nonce: already used for task {_short(seen[1])}")
                    return int(seen[0]), True
            cur = conn.execute(
                "INSERT INTO submissions (task_id, annotator, created, ranking, best_id, edited, comment, nonce) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sub.task_id, annotator, time.time(), json.dumps(ranks), best, edited, sub.comment, sub.nonce))
            return int(cur.lastrowid), False

    def next_task(self, annotator: str, skip: list[str]) -> dict:
        """The next task for ``annotator`` (not yet done by them, fewest annotators first, then file order),
        blind: opaque response keys in a per-annotator shuffled order, no labels; plus progress counts."""
        marks = ",".join("?" * len(skip))
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT t.data FROM tasks t WHERE t.id NOT IN (SELECT task_id FROM submissions WHERE annotator = ?)"
                + (f" AND t.id NOT IN ({marks})" if skip else "")
                + " ORDER BY (SELECT COUNT(DISTINCT annotator) FROM submissions s WHERE s.task_id = t.id), "
                  "t.position LIMIT 1", [annotator, *skip]).fetchall()
            total = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            done = conn.execute("SELECT COUNT(DISTINCT task_id) FROM submissions WHERE annotator = ?",
                                (annotator,)).fetchone()[0]
        task = None
        if rows:
            t = json.loads(rows[0][0])
            resps = [{"id": blind_key(t["id"], annotator, r["id"]), "text": r["text"]} for r in t["responses"]]
            random.Random(f"{t['id']}:{annotator}").shuffle(resps)
            task = {"id": t["id"], "prompt": t["prompt"], "responses": resps}
        return {"annotator": annotator, "task": task, "total": total, "done": done}

    def counts(self) -> dict:
        """Submission, annotated-task and annotator counts (for the page's stats endpoint)."""
        with self._conn() as conn:
            n = conn.execute("SELECT COUNT(*), COUNT(DISTINCT task_id), COUNT(DISTINCT annotator) "
                             "FROM submissions").fetchone()
        return {"submissions": n[0], "tasks_annotated": n[1], "annotators": n[2]}
