"""Ranking web app for human annotation, and export of demonstrations and preferences.

Commands (``posttrain annotate ...``)::

    posttrain annotate serve --db annotations.sqlite TASKS [--host 127.0.0.1] [--port 8765] [--token T]
    posttrain annotate export --db annotations.sqlite --out DIR [--pairs all|best_worst]

Input (serve): TASKS, the ``tasks.jsonl`` of stage ``respond`` (or its
folder): one record per instruction, ``{"id", "prompt": [messages],
"responses": [{"id", "text", ...}, ...]}`` with at least two responses. Tasks
are copied into the database, so the database alone is enough for export.

The page (standard-library ``ThreadingHTTPServer``, one HTML/JS page, no
framework) shows an instruction and its responses in a per-annotator shuffled
order without their source labels; the annotator gives each response a rank
(1 = best; equal numbers are ties), may edit the best response, and submits.
Every submission is one INSERT into SQLite in WAL mode with the annotator id
and the time, committed before the reply, so several annotators at once lose
nothing; a re-submission of a task by the same annotator is stored too and the
latest one counts. The server binds 127.0.0.1 unless told otherwise; with
``--token`` (or ``POSTTRAIN_ANNOTATE_TOKEN``) every request must carry the token
(``?token=`` on the page URL, then a cookie / ``X-Annotate-Token`` header).

Output (export), for each (task, annotator) latest submission:

* ``demonstrations.jsonl``: prompt + the top-ranked response (the edited text
  when edited); ``meta`` names the task, annotator, response and whether edited;
* ``preferences.jsonl``: ranked pairs, ``pairs: all`` = every pair with
  different ranks, ``best_worst`` = the best response against each response
  of the worst rank; ``margin`` = rank difference; original (unedited) texts;
* ``stats.json``.
The stage kind ``annotation_export`` does the same inside a recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import http.cookies
import json
import logging
import os
import random
import sqlite3
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlparse

from posttrain.core.config import key
from posttrain.core.records import RecordError, iter_records, preference, demonstration, record_id, write_records

log = logging.getLogger("posttrain.annotate")

MAX_BODY = 2_000_000  # bytes; a submission is a ranking and at most one edited response
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, position INTEGER NOT NULL, data TEXT NOT NULL);
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


@dataclass
class AnnotationExportConfig:
    """Keys of stage ``annotation_export`` (annotations database -> demonstrations and preferences)."""

    db: str = key(doc="the SQLite database written by `posttrain annotate serve`", input=True)
    pairs: Literal["all", "best_worst"] = key("all", "preference pairs: every ranked pair, or best vs worst")


# ---------------------------------------------------------------- tasks and database

def load_tasks(path: str | os.PathLike) -> list[dict]:
    """Read and check annotation tasks; a bad task raises RecordError naming the file and record."""
    p = Path(path)
    if p.is_dir() and (p / "tasks.jsonl").exists():
        p = p / "tasks.jsonl"
    tasks, seen = [], set()
    for n, rec in enumerate(iter_records(p, "prompt"), 1):
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


def connect(db: str | os.PathLike, init: bool = True) -> sqlite3.Connection:
    """Open the annotations database (WAL, autocommit, waits up to 30 s for a busy writer);
    ``init`` creates the tables and switches the file to WAL (once, at server start)."""
    conn = sqlite3.connect(str(db), timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA synchronous=FULL")  # a reply means the row is on disk
    if init:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
        conn.executescript(SCHEMA)
    return conn


def import_tasks(conn: sqlite3.Connection, tasks: list[dict]) -> int:
    """Copy tasks into the database (existing ids are kept as they are); return how many were new."""
    before = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT OR IGNORE INTO tasks (id, position, data) VALUES (?, ?, ?)",
                     [(t["id"], before + i, json.dumps(t, ensure_ascii=False)) for i, t in enumerate(tasks)])
    conn.execute("COMMIT")
    return conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] - before


def check_submission(task: dict, body: dict) -> tuple[str, dict[str, int], str, str | None]:
    """Validate a submission against its task; return (annotator, ranks, best_id, edited) or raise ValueError."""
    annotator = body.get("annotator")
    if not isinstance(annotator, str) or not annotator.strip() or len(annotator) > 100:
        raise ValueError("annotator: give a name of 1-100 characters")
    ranking = body.get("ranking")
    ids = [r["id"] for r in task["responses"]]
    if not isinstance(ranking, dict) or set(ranking) != set(ids):
        raise ValueError("ranking: give a rank to every response of the task")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= len(ids) for v in ranking.values()):
        raise ValueError(f"ranking: ranks must be integers from 1 to {len(ids)}")
    top = min(ranking.values())
    best = body.get("best_id")
    if best is None:
        best = next(i for i in ids if ranking[i] == top)
    if best not in ranking or ranking[best] != top:
        raise ValueError("best_id must be one of the top-ranked responses")
    edited = body.get("edited")
    if edited is not None and (not isinstance(edited, str) or len(edited) > MAX_BODY // 2):
        raise ValueError("edited: must be a string")
    original = next(r["text"] for r in task["responses"] if r["id"] == best)
    if edited is not None and (edited == original or not edited.strip()):
        edited = None  # an untouched (or emptied) edit box is not an edit
    return annotator.strip(), ranking, best, edited


def submit(conn: sqlite3.Connection, body: dict) -> int:
    """Store one submission (validated) and return its row id."""
    row = conn.execute("SELECT data FROM tasks WHERE id = ?", (body.get("task_id"),)).fetchone()
    if row is None:
        raise ValueError(f"task_id: no task {body.get('task_id')!r}")
    annotator, ranking, best, edited = check_submission(json.loads(row[0]), body)
    comment = body.get("comment") if isinstance(body.get("comment"), str) else None
    cur = conn.execute("INSERT INTO submissions (task_id, annotator, created, ranking, best_id, edited, comment) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (body["task_id"], annotator, time.time(), json.dumps(ranking), best, edited, comment))
    return int(cur.lastrowid)


def next_task(conn: sqlite3.Connection, annotator: str, skip: list[str]) -> dict:
    """The next task for ``annotator``: not yet done by them, fewest annotators first, then file order."""
    marks = ",".join("?" * len(skip))
    rows = conn.execute(
        "SELECT t.id, t.data FROM tasks t WHERE t.id NOT IN (SELECT task_id FROM submissions WHERE annotator = ?)"
        + (f" AND t.id NOT IN ({marks})" if skip else "")
        + " ORDER BY (SELECT COUNT(DISTINCT annotator) FROM submissions s WHERE s.task_id = t.id), t.position LIMIT 1",
        [annotator, *skip]).fetchall()
    total = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    done = conn.execute("SELECT COUNT(DISTINCT task_id) FROM submissions WHERE annotator = ?", (annotator,)).fetchone()[0]
    task = None
    if rows:
        t = json.loads(rows[0][1])
        resps = [{"id": r["id"], "text": r["text"]} for r in t["responses"]]  # blind: no labels or samplers
        random.Random(f"{t['id']}:{annotator}").shuffle(resps)
        task = {"id": t["id"], "prompt": t["prompt"], "responses": resps}
    return {"task": task, "total": total, "done": done}


# ---------------------------------------------------------------- export

def ranking_pairs(order: list[str], ranks: dict[str, int], mode: str, best_id: str) -> list[tuple[str, str]]:
    """(better, worse) response-id pairs of one ranking; ties give no pair.

    ``all``: every pair with different ranks (in ``order``); ``best_worst``: ``best_id``
    against each response of the worst rank.
    """
    if mode == "best_worst":
        worst = max(ranks.values())
        return [(best_id, i) for i in order if ranks[i] == worst and ranks[i] > ranks[best_id]]
    return [(a, b) for a in order for b in order if ranks[a] < ranks[b]]


def export(db: str | os.PathLike, out_dir: str | os.PathLike, pairs: str = "all") -> dict:
    """Write demonstrations.jsonl, preferences.jsonl and stats.json from the latest submission of each
    (task, annotator); return the stats."""
    if not Path(db).exists():
        raise FileNotFoundError(f"{db}: no such annotations database")
    conn = connect(db)
    try:
        tasks = {i: json.loads(d) for i, d in conn.execute("SELECT id, data FROM tasks")}
        subs = conn.execute(
            "SELECT s.task_id, s.annotator, s.created, s.ranking, s.best_id, s.edited, s.id FROM submissions s "
            "WHERE s.id = (SELECT MAX(id) FROM submissions x WHERE x.task_id = s.task_id AND x.annotator = s.annotator) "
            "ORDER BY s.id").fetchall()
        n_all = conn.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
    finally:
        conn.close()
    demos, prefs = [], []
    for task_id, annotator, created, ranking, best_id, edited, sub_id in subs:
        task = tasks[task_id]
        ranks = json.loads(ranking)
        texts = {r["id"]: r for r in task["responses"]}
        order = [r["id"] for r in task["responses"]]
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        base = {"task_id": task_id, "annotator": annotator, "submitted": when, "submission": sub_id}
        best = texts[best_id]
        demos.append(demonstration(task["prompt"] + [{"role": "assistant", "content": edited or best["text"]}],
                                   source="annotation", id=record_id("annot-demo", task_id, annotator),
                                   meta={**base, "response_id": best_id, "edited": edited is not None,
                                         "label": best.get("label")}))
        for a, b in ranking_pairs(order, ranks, pairs, best_id):
            prefs.append(preference(task["prompt"], texts[a]["text"], texts[b]["text"], source="annotation",
                                    id=record_id("annot-pref", task_id, annotator, a, b), margin=ranks[b] - ranks[a],
                                    meta={**base, "chosen_id": a, "rejected_id": b, "chosen_rank": ranks[a],
                                          "rejected_rank": ranks[b], "chosen_label": texts[a].get("label"),
                                          "rejected_label": texts[b].get("label")}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "demonstrations.jsonl", demos, "demonstration")
    write_records(out / "preferences.jsonl", prefs, "preference")
    stats = {"submissions": n_all, "latest_submissions": len(subs), "tasks": len(tasks),
             "tasks_annotated": len({s[0] for s in subs}), "annotators": len({s[1] for s in subs}),
             "demonstrations": len(demos), "edited": sum(d["meta"]["edited"] for d in demos),
             "preferences": len(prefs), "pairs": pairs}
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return stats


def run_export_stage(cfg: AnnotationExportConfig, ctx) -> dict:
    """Entry point of stage kind ``annotation_export``."""
    return export(ctx.resolve(cfg.db), ctx.out_dir, cfg.pairs)


# ---------------------------------------------------------------- HTTP server

class _Handler(BaseHTTPRequestHandler):
    server: "AnnotationServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # route the access log to logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if code >= 400:  # an unread request body must not leak into the next request on this connection
            self.close_connection = True
            self.send_header("Connection", "close")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: dict) -> None:
        self._send(code, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _authorised(self, query: dict) -> bool:
        token = self.server.token
        if not token:
            return True
        given = (query.get("token") or [None])[0] or self.headers.get("X-Annotate-Token")
        if not given and self.headers.get("Cookie"):
            c = http.cookies.SimpleCookie(self.headers["Cookie"])
            given = c["annotate_token"].value if "annotate_token" in c else None
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if not self._authorised(q):
            return self._send(401, b"annotation server: missing or wrong token (open the page with ?token=...)\n",
                              "text/plain; charset=utf-8")
        if url.path in ("/", "/index.html"):
            extra = {}
            if self.server.token:
                extra["Set-Cookie"] = f"annotate_token={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
            return self._send(200, PAGE.encode(), "text/html; charset=utf-8", extra)
        if url.path == "/api/next":
            annotator = (q.get("annotator") or [""])[0].strip()
            if not annotator:
                return self._json(400, {"error": "annotator: give a name"})
            skip = [s for s in (q.get("skip") or [""])[0].split(",") if s][:1000]
            with self.server.db() as conn:
                return self._json(200, next_task(conn, annotator, skip))
        if url.path == "/api/stats":
            with self.server.db() as conn:
                n = conn.execute("SELECT COUNT(*), COUNT(DISTINCT task_id), COUNT(DISTINCT annotator) FROM submissions").fetchone()
            return self._json(200, {"submissions": n[0], "tasks_annotated": n[1], "annotators": n[2]})
        self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if not self._authorised(parse_qs(url.query)):
            return self._json(401, {"error": "missing or wrong token"})
        if url.path != "/api/submit":
            return self._json(404, {"error": "not found"})
        n = int(self.headers.get("Content-Length") or 0)
        if n <= 0 or n > MAX_BODY:
            return self._json(413 if n > MAX_BODY else 400, {"error": "body: expected a JSON object"})
        try:
            body = json.loads(self.rfile.read(n))
            if not isinstance(body, dict):
                raise ValueError("body: expected a JSON object")
            with self.server.db() as conn:
                sid = submit(conn, body)
        except (ValueError, json.JSONDecodeError) as e:
            return self._json(400, {"error": str(e)})
        log.info("submission %d: task %s by %s", sid, body.get("task_id"), body.get("annotator"))
        self._json(200, {"ok": True, "submission": sid})


class AnnotationServer(ThreadingHTTPServer):
    """The annotation HTTP server: ``AnnotationServer(db, tasks, host, port, token).serve_forever()``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, db: str | os.PathLike, tasks: str | os.PathLike | None, host: str = "127.0.0.1",
                 port: int = 8765, token: str | None = None):
        self.token = token or None
        conn = connect(db)
        try:
            if tasks is not None:
                added = import_tasks(conn, load_tasks(tasks))
                log.info("annotate: %d new tasks loaded from %s", added, tasks)
            if conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 0:
                raise RecordError(f"{db}: no tasks (give a TASKS file)")
        finally:
            conn.close()
        self.db_path = str(db)
        super().__init__((host, port), _Handler)

    def db(self) -> contextlib.closing:
        """A fresh connection for one request (sqlite3 connections do not cross threads), closed after."""
        return contextlib.closing(connect(self.db_path, init=False))

    @property
    def url(self) -> str:
        """The page address (with the token when one is set)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/" + (f"?token={self.token}" if self.token else "")


# ---------------------------------------------------------------- command line

def _cmd_serve(a: argparse.Namespace) -> int:
    token = a.token or os.environ.get("POSTTRAIN_ANNOTATE_TOKEN")
    if a.host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("annotate: listening on %s without a token: anyone who can reach it can annotate", a.host)
    srv = AnnotationServer(a.db, a.tasks, a.host, a.port, token)
    print(f"annotation page: {srv.url}  (Ctrl-C to stop)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    stats = export(a.db, a.out, a.pairs)
    print(json.dumps(stats))
    return 0


def add_cli(sub) -> None:
    """Add ``posttrain annotate serve|export`` to the command line."""
    p = sub.add_parser("annotate", help="ranking web app for human annotation, and its export")
    asub = p.add_subparsers(dest="annotate_cmd", required=True)
    s = asub.add_parser("serve", help="serve the ranking page (binds 127.0.0.1 unless --host says otherwise)")
    s.add_argument("tasks", nargs="?", help="tasks.jsonl of stage respond (optional when the db already has tasks)")
    s.add_argument("--db", required=True, help="SQLite file for tasks and submissions (created if missing)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--token", default=None, help="shared token required on every request "
                                                 "(default: $POSTTRAIN_ANNOTATE_TOKEN, else none)")
    s.set_defaults(fn=_cmd_serve)
    e = asub.add_parser("export", help="write demonstrations.jsonl and preferences.jsonl from the submissions")
    e.add_argument("--db", required=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--pairs", choices=["all", "best_worst"], default="all")
    e.set_defaults(fn=_cmd_export)


# ---------------------------------------------------------------- the page

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>posttrain annotate</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:center}
header h1{font-size:17px;margin:0;font-weight:600}
header input{padding:4px 8px;border-radius:4px;border:0}
main{max-width:1100px;margin:0 auto;padding:16px 20px}
.box{background:#fff;border-radius:8px;padding:12px 16px;margin-bottom:14px;box-shadow:0 1px 2px #0002}
.text{white-space:pre-wrap;word-wrap:break-word}
.turn{margin:4px 0}.role{font-size:12px;color:#667;text-transform:uppercase}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.response h3{margin:0 0 6px;font-size:14px;display:flex;justify-content:space-between;align-items:center}
.response.best{outline:2px solid #2e7d32}
select.rank{font-size:14px;padding:2px 6px}
textarea{width:100%;min-height:140px;font:inherit;box-sizing:border-box;padding:8px}
button{font-size:15px;padding:6px 18px;border-radius:5px;border:0;background:#2e7d32;color:#fff;cursor:pointer}
button.secondary{background:#8a93a6}
#status{margin-left:12px}.err{color:#b00020}.ok{color:#2e7d32}
.hint{color:#667;font-size:13px}
</style></head><body>
<header><h1>Rank the responses</h1>
<label>Annotator <input id="annotator" placeholder="your name" autocomplete="username"></label>
<span id="progress" class="hint" style="color:#cfd6e4"></span></header>
<main>
<div class="box"><div class="hint">Instruction</div><div id="instruction"></div></div>
<p class="hint">Give each response a rank: 1 is best; give equal ranks to responses that are equally good.
The text of the best response is copied below; correct it if needed, then submit.</p>
<div id="responses" class="grid"></div>
<div class="box"><div class="hint">Best response (editable)</div><textarea id="edit"></textarea></div>
<div><button id="submit">Submit</button> <button id="skip" class="secondary">Skip</button><span id="status"></span></div>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const headers = token ? {"X-Annotate-Token": token} : {};
const $ = (id) => document.getElementById(id);
let task = null, skipped = [], editedFor = null;
$("annotator").value = localStorage.getItem("annotator") || "";

function status(msg, cls) { const s = $("status"); s.textContent = msg; s.className = cls || ""; }

function ranks() {
  const out = {};
  document.querySelectorAll("select.rank").forEach(s => { if (s.value) out[s.dataset.id] = parseInt(s.value, 10); });
  return out;
}
function bestId() {
  const r = ranks(); let best = null;
  for (const resp of task.responses) if (r[resp.id] !== undefined && (best === null || r[resp.id] < r[best])) best = resp.id;
  return best;
}
function refreshBest() {
  const best = bestId();
  document.querySelectorAll(".response").forEach(d => d.classList.toggle("best", d.dataset.id === best));
  // refill the edit box when the best response changes, unless the annotator already edited it
  if (best && best !== editedFor && !$("edit").dataset.dirty) {
    $("edit").value = task.responses.find(r => r.id === best).text; editedFor = best;
  }
}
function render() {
  const ins = $("instruction"); ins.replaceChildren();
  const box = $("responses"); box.replaceChildren();
  $("edit").value = ""; delete $("edit").dataset.dirty; editedFor = null;
  if (!task) { ins.textContent = "No more tasks for you. Thank you!"; $("submit").disabled = true; return; }
  $("submit").disabled = false;
  for (const m of task.prompt) {
    const t = document.createElement("div"); t.className = "turn";
    const role = document.createElement("div"); role.className = "role"; role.textContent = m.role;
    const txt = document.createElement("div"); txt.className = "text"; txt.textContent = m.content;
    t.append(role, txt); ins.append(t);
  }
  task.responses.forEach((r, i) => {
    const d = document.createElement("div"); d.className = "box response"; d.dataset.id = r.id;
    const h = document.createElement("h3"); h.textContent = "Response " + String.fromCharCode(65 + i);
    const sel = document.createElement("select"); sel.className = "rank"; sel.dataset.id = r.id;
    sel.setAttribute("aria-label", "rank of response " + String.fromCharCode(65 + i));
    const none = document.createElement("option"); none.value = ""; none.textContent = "rank…"; sel.append(none);
    for (let k = 1; k <= task.responses.length; k++) {
      const o = document.createElement("option"); o.value = String(k); o.textContent = String(k); sel.append(o);
    }
    sel.addEventListener("change", refreshBest);
    h.append(sel);
    const txt = document.createElement("div"); txt.className = "text"; txt.textContent = r.text;
    d.append(h, txt); box.append(d);
  });
}
async function load() {
  const who = $("annotator").value.trim();
  if (!who) { status("Enter your name first.", "err"); return; }
  localStorage.setItem("annotator", who);
  const q = new URLSearchParams({annotator: who, skip: skipped.join(",")});
  const r = await fetch("api/next?" + q, {headers});
  if (!r.ok) { status("Could not load a task (" + r.status + ").", "err"); return; }
  const data = await r.json();
  task = data.task; render();
  if ($("status").className !== "ok") status("");
  $("progress").textContent = data.done + " of " + data.total + " done by you";
}
$("edit").addEventListener("input", () => { $("edit").dataset.dirty = "1"; });
$("annotator").addEventListener("change", () => { skipped = []; load(); });
$("annotator").addEventListener("keydown", (e) => { if (e.key === "Enter") $("annotator").blur(); });
$("skip").addEventListener("click", () => { if (task) skipped.push(task.id); status(""); load(); });
$("submit").addEventListener("click", async () => {
  const r = ranks();
  if (!task || Object.keys(r).length !== task.responses.length) { status("Rank every response first.", "err"); return; }
  const best = bestId();
  const body = {task_id: task.id, annotator: $("annotator").value.trim(), ranking: r, best_id: best,
                edited: $("edit").dataset.dirty ? $("edit").value : null};
  $("submit").disabled = true; status("Saving…");
  try {
    const res = await fetch("api/submit", {method: "POST", headers: {...headers, "Content-Type": "application/json"},
                                           body: JSON.stringify(body)});
    const data = await res.json();
    if (!res.ok) { status(data.error || ("error " + res.status), "err"); $("submit").disabled = false; return; }
    status("Saved (#" + data.submission + ").", "ok");
    await load();
  } catch (e) { status("Network error: " + e, "err"); $("submit").disabled = false; }
});
if ($("annotator").value) load(); else status("Enter your name to start.", "");
</script></body></html>
"""
