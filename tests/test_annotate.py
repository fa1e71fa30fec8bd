"""Annotation app: tasks, tokens, blind keys, agreement, Host/Origin checks, malformed requests,
100 simultaneous submissions against the real `posttrain annotate serve`, export, and a real browser."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest

from data_synthesis.annotate.agreement import agreement
from data_synthesis.annotate.export import export, ranking_pairs
from data_synthesis.annotate.server import AnnotationServer, allowed_names, origin_problem
from data_synthesis.annotate.store import Store, blind_key, load_tasks
from posttrain.cli import main as cli_main
from posttrain.core.errors import BadInput, RecordError
from posttrain.core.records import read_records

REPO = Path(__file__).resolve().parents[1]
# httpx's default timeout is 5 s: on a loaded 2-core machine a request to a live server may wait longer than
# that without anything being wrong, so every request here gets a generous one (a hang still fails the test)
TIMEOUT = 120
http_get = partial(httpx.get, timeout=TIMEOUT)
http_post = partial(httpx.post, timeout=TIMEOUT)


def write_tasks(path: Path, n: int = 5, k: int = 3) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "id": f"task{i}", "prompt": [{"role": "user", "content": f"Instruction number {i}: explain tides."}],
                "source": "respond",
                "responses": [{"id": f"r{i}-{j}", "text": f"Response {j} to instruction {i}.", "label": f"gen{j % 2}"}
                              for j in range(k)]}) + "\n")
    return path


def keyed(task_id: str, who: str, ranks: dict[str, int]) -> dict[str, int]:
    """A ranking by response id, rewritten with the blind keys that ``who`` sees."""
    return {blind_key(task_id, who, rid): v for rid, v in ranks.items()}


@pytest.fixture()
def server(tmp_path):
    srv = AnnotationServer(tmp_path / "ann.sqlite", write_tasks(tmp_path / "tasks.jsonl"), "127.0.0.1", 0).start(timeout=300)
    srv.tokens = {name: srv.store.add_annotator(name) for name in ("alice", "bob")}
    srv.base = srv.url.rstrip("/")
    yield srv
    srv.shutdown()


def auth(srv, name: str) -> dict:
    return {"Authorization": f"Bearer {srv.tokens[name]}"}


def assert_one_line_error(r: httpx.Response, code: int, *words: str) -> None:
    assert r.status_code == code, (r.status_code, r.text)
    msg = r.json()["error"]
    assert msg and "\n" not in msg and all(w in msg for w in words), msg


# ---------------------------------------------------------------- tasks, pairs, agreement

def test_load_tasks_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"id": "a", "prompt": "hi", "responses": [{"text": "only one"}]}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl: record 1 \(id a\): 'responses' must be a list of at least 2"):
        load_tasks(p)
    p.write_text(json.dumps({"id": "a", "prompt": "hi", "responses": [{"id": "x", "text": "1"}, {"id": "x", "text": "2"}]}))
    with pytest.raises(RecordError, match="repeated"):
        load_tasks(p)
    p.write_text("{not json\n")
    with pytest.raises(BadInput, match="bad.jsonl"):
        load_tasks(p)


def test_ranking_pairs_all_and_best_worst_with_ties():
    order = ["a", "b", "c", "d"]
    ranks = {"a": 2, "b": 1, "c": 2, "d": 3}
    assert ranking_pairs(order, ranks, "all", "b") == [("a", "d"), ("b", "a"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert ranking_pairs(order, ranks, "best_worst", "b") == [("b", "d")]
    tie = {"a": 1, "b": 1, "c": 1, "d": 1}
    assert ranking_pairs(order, tie, "all", "a") == [] and ranking_pairs(order, tie, "best_worst", "a") == []


def test_agreement_statistics_by_hand():
    same = agreement({"t1": {"a": {"p": 1, "q": 2, "r": 3}, "b": {"p": 1, "q": 2, "r": 3}},
                      "t2": {"a": {"x": 1, "y": 1, "z": 3}, "b": {"x": 1, "y": 1, "z": 2}}})  # same order, other numbers
    assert same["pairwise_agreement"] == 1.0 and same["pairwise_agreement_with_ties"] == 1.0
    assert same["kendall_tau_b"] == 1.0 and same["krippendorff_alpha_ordinal"] == 1.0
    assert same["response_pairs_both_ordered"] == 3 + 2 and same["response_pairs_compared"] == 6
    # one swap of three pairs: 2/3 agree; tau = (2 concordant - 1 discordant) / 3
    part = agreement({"t": {"a": {"p": 1, "q": 2, "r": 3}, "b": {"p": 1, "q": 3, "r": 2}}})
    assert part["pairwise_agreement"] == 0.6667 and part["kendall_tau_b"] == 0.3333
    # two responses, opposite order: alpha by hand (ordinal): D_o = 4, D_e = 32/12, alpha = 1 - 1.5 = -0.5
    opp = agreement({"t": {"a": {"p": 1, "q": 2}, "b": {"p": 2, "q": 1}}})
    assert opp["pairwise_agreement"] == 0.0 and opp["kendall_tau_b"] == -1.0 and opp["krippendorff_alpha_ordinal"] == -0.5
    # an all-ties ranking: no strictly ordered pair in common, tau undefined; ties-aware agreement still defined
    tie = agreement({"t": {"a": {"p": 1, "q": 1}, "b": {"p": 1, "q": 2}}})
    assert tie["pairwise_agreement"] is None and tie["kendall_tau_b"] is None and tie["kendall_tau_b_pairs"] == 0
    assert tie["pairwise_agreement_with_ties"] == 0.0
    # nobody shares a task: nothing is defined
    alone = agreement({"t1": {"a": {"p": 1, "q": 2}}, "t2": {"b": {"p": 2, "q": 1}}})
    assert alone["tasks_with_2plus_annotators"] == 0
    assert all(alone[k] is None for k in ("pairwise_agreement", "pairwise_agreement_with_ties", "kendall_tau_b",
                                          "krippendorff_alpha_ordinal"))


# ---------------------------------------------------------------- annotators and tokens

def test_tokens_are_stored_as_hashes_and_map_to_one_name(tmp_path):
    db = tmp_path / "a.sqlite"
    store = Store(db)
    tok = store.add_annotator("alice")
    assert len(tok) >= 32 and store.annotator_for(tok) == "alice"
    assert store.annotator_for(tok + "x") is None and store.annotator_for("") is None and store.annotator_for(None) is None
    dump = "\n".join(sqlite3.connect(db).iterdump())
    assert tok not in dump and "alice" in dump  # only the hash is kept
    with pytest.raises(BadInput, match="already exists"):
        store.add_annotator("alice")
    new = store.add_annotator("alice", rotate=True)
    assert store.annotator_for(new) == "alice" and store.annotator_for(tok) is None
    with pytest.raises(BadInput, match="no annotator 'carol'"):
        store.add_annotator("carol", rotate=True)
    for bad in ("", "   ", "x" * 101, "tab\there"):
        with pytest.raises(BadInput, match="1-100 printable"):
            store.add_annotator(bad)


def test_api_needs_a_token_and_the_link_sets_a_cookie(server):
    assert http_get(f"{server.base}/api/next").status_code == 401
    assert http_get(f"{server.base}/api/stats").status_code == 401
    assert http_get(f"{server.base}/api/next", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = http_post(f"{server.base}/api/submit", json={"task_id": "task0", "ranking": {"a": 1}})
    assert_one_line_error(r, 401, "token")
    page = http_get(f"{server.base}/")  # the page itself is static: it asks for a token when the API says 401
    assert page.status_code == 200 and "script-src 'sha256-" in page.headers["content-security-policy"]
    assert http_get(f"{server.base}/", params={"token": "wrong"}).status_code == 401
    with httpx.Client(timeout=TIMEOUT) as c:
        r = c.get(f"{server.base}/", params={"token": server.tokens["bob"]})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert c.get(f"{server.base}/api/next").json()["annotator"] == "bob"  # the cookie now identifies bob


def test_blind_keys_and_submission_checks(server):
    nxt = http_get(f"{server.base}/api/next", headers=auth(server, "alice")).json()
    task = nxt["task"]
    assert nxt["total"] == 5 and nxt["annotator"] == "alice" and task["id"] == "task0"
    keys = [r["id"] for r in task["responses"]]
    assert not {"r0-0", "r0-1", "r0-2"} & set(keys) and all(set(r) == {"id", "text"} for r in task["responses"])
    bob = http_get(f"{server.base}/api/next", headers=auth(server, "bob")).json()["task"]
    assert set(keys).isdisjoint(r["id"] for r in bob["responses"])  # keys are per annotator
    full = {k: n + 1 for n, k in enumerate(keys)}
    post = lambda body, who="alice": http_post(f"{server.base}/api/submit", json=body, headers=auth(server, who))  # noqa: E731
    assert_one_line_error(post({"task_id": "task0", "ranking": {keys[0]: 1}}), 400, "every response")
    assert_one_line_error(post({"task_id": "nope", "ranking": full}), 400, "no task")
    assert_one_line_error(post({"task_id": "task0", "ranking": full, "best_id": keys[2]}), 400, "best_id")
    assert_one_line_error(post({"task_id": "task0", "ranking": {k: 9 for k in keys}}), 400, "from 1 to 3")
    assert_one_line_error(post({"task_id": "task0", "ranking": full}, who="bob"), 400, "every response")  # alice's keys
    assert_one_line_error(post({"task_id": "task0", "ranking": full, "annotator": "bob"}), 400, "token")
    assert_one_line_error(post({"task_id": "task0", "ranking": full, "extra": 1}), 400, "unknown key 'extra'")
    ok = post({"task_id": "task0", "ranking": full})
    assert ok.status_code == 200 and ok.json()["ok"] and not ok.json()["retry"]
    assert http_get(f"{server.base}/api/next", headers=auth(server, "alice")).json()["task"]["id"] == "task1"
    assert http_get(f"{server.base}/api/next", headers=auth(server, "bob")).json()["task"]["id"] == "task1"  # fewest first
    assert http_get(f"{server.base}/api/stats", headers=auth(server, "bob")).json() == {
        "submissions": 1, "tasks_annotated": 1, "annotators": 1}


def test_rankings_keep_their_author_and_agreement_is_exported(server, tmp_path):
    def post(who: str, ranks: dict[str, int], **extra) -> httpx.Response:
        r = http_post(f"{server.base}/api/submit", headers=auth(server, who),
                       json={"task_id": "task0", "ranking": keyed("task0", who, ranks), **extra})
        assert r.status_code == 200, r.text
        return r

    post("alice", {"r0-0": 1, "r0-1": 2, "r0-2": 3})
    post("bob", {"r0-0": 1, "r0-1": 3, "r0-2": 2}, edited="bob's better answer")
    post("alice", {"r0-0": 1, "r0-1": 1, "r0-2": 3})  # alice changes her mind: her latest counts, bob's stays
    st = export(tmp_path / "ann.sqlite", tmp_path / "out", "all")
    assert st["submissions"] == 3 and st["latest_submissions"] == 2 and st["per_annotator"] == {"alice": 1, "bob": 1}
    prefs = read_records(tmp_path / "out" / "preferences.jsonl")
    got = sorted((p["meta"]["annotator"], p["meta"]["chosen_id"], p["meta"]["rejected_id"]) for p in prefs)
    assert got == [("alice", "r0-0", "r0-2"), ("alice", "r0-1", "r0-2"),
                   ("bob", "r0-0", "r0-1"), ("bob", "r0-0", "r0-2"), ("bob", "r0-2", "r0-1")]
    demos = {d["meta"]["annotator"]: d for d in read_records(tmp_path / "out" / "demonstrations.jsonl")}
    assert demos["bob"]["messages"][-1]["content"] == "bob's better answer" and demos["bob"]["meta"]["edited"]
    assert demos["alice"]["meta"]["response_id"] == "r0-0" and not demos["alice"]["meta"]["edited"]
    ag = st["agreement"]  # pairs: (0,1) alice tie vs bob 0>1; (0,2) agree; (1,2) alice 1>2, bob 2>1
    assert ag["tasks_with_2plus_annotators"] == 1 and ag["response_pairs_both_ordered"] == 2
    assert ag["pairwise_agreement"] == 0.5 and ag["pairwise_agreement_with_ties"] == 0.3333
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["agreement"] == ag


def test_a_retried_submission_is_stored_once(server, tmp_path):
    body = {"task_id": "task1", "ranking": keyed("task1", "alice", {"r1-0": 2, "r1-1": 1, "r1-2": 3}), "nonce": "n-1"}
    first = http_post(f"{server.base}/api/submit", json=body, headers=auth(server, "alice")).json()
    again = http_post(f"{server.base}/api/submit", json=body, headers=auth(server, "alice")).json()
    assert again == {"ok": True, "submission": first["submission"], "retry": True}
    other = dict(body, task_id="task2", ranking=keyed("task2", "alice", {"r2-0": 1, "r2-1": 2, "r2-2": 3}))
    assert_one_line_error(http_post(f"{server.base}/api/submit", json=other, headers=auth(server, "alice")), 400, "nonce")
    bob = dict(body, ranking=keyed("task1", "bob", {"r1-0": 2, "r1-1": 1, "r1-2": 3}))  # nonces are per annotator
    assert http_post(f"{server.base}/api/submit", json=bob, headers=auth(server, "bob")).json()["retry"] is False
    assert sqlite3.connect(tmp_path / "ann.sqlite").execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 2


# ---------------------------------------------------------------- Host and Origin

def test_host_and_origin_are_checked(server, tmp_path):
    h, port = auth(server, "alice"), server.port
    good = {"task_id": "task0", "ranking": keyed("task0", "alice", {"r0-0": 1, "r0-1": 2, "r0-2": 3})}
    assert_one_line_error(http_get(f"{server.base}/api/next", headers={**h, "Host": "evil.example"}), 400, "evil.example")
    assert_one_line_error(http_get(f"{server.base}/", headers={"Host": f"attacker.test:{port}"}), 400, "allow-host")
    # a cross-site "simple" POST (text/plain, no preflight) and other foreign origins
    for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null", f"https://localhost.evil:{port}"):
        r = http_post(f"{server.base}/api/submit", content=json.dumps(good),
                       headers={**h, "Origin": origin, "Content-Type": "text/plain"})
        assert_one_line_error(r, 403, "Origin")
    assert_one_line_error(http_post(f"{server.base}/api/submit", content=json.dumps(good),
                                     headers={**h, "Origin": f"http://127.0.0.1:{port}", "Content-Type": "text/plain"}),
                          415, "application/json")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):  # loopback names of a loopback bind
        r = http_get(f"{server.base}/api/next", headers={**h, "Host": host, "Origin": f"http://{host}"})
        assert r.status_code == 200, (host, r.text)
    r = http_post(f"{server.base}/api/submit", json=good, headers={**h, "Origin": f"http://localhost:{port}",
                                                                     "Host": f"localhost:{port}"})
    assert r.status_code == 200, r.text
    # pure checks: an added name, a wildcard bind, and an Origin that names the right host on the wrong port
    names = allowed_names("127.0.0.1", ["annotate.example.org"])
    assert origin_problem({"host": "annotate.example.org", "origin": "https://annotate.example.org"}, names) is None
    assert origin_problem({"host": "annotate.example.org:8765", "origin": "http://annotate.example.org"}, names)[0] == 403
    assert origin_problem({"host": "other.example.org"}, names)[0] == 400
    assert origin_problem({}, names)[0] == 400
    assert socket.gethostname().lower() in allowed_names("0.0.0.0") and "0.0.0.0" not in allowed_names("0.0.0.0")
    srv = AnnotationServer(tmp_path / "ann.sqlite", None, "127.0.0.1", 0, allow_hosts=["annotate.example.org"]).start()
    try:
        r = http_get(f"{srv.url}api/next", headers={**h, "Host": f"annotate.example.org:{srv.port}"})
        assert r.status_code == 200 and r.json()["annotator"] == "alice"
    finally:
        srv.shutdown()


# ---------------------------------------------------------------- malformed requests

MALFORMED = [
    ({"task_id": ["task0"], "ranking": {"a": 1}}, "task_id"),
    ({"task_id": {"id": "task0"}, "ranking": {"a": 1}}, "task_id"),
    ({"task_id": "task0", "ranking": ["a", "b"]}, "ranking"),
    ({"task_id": "task0", "ranking": {"a": [1]}}, "whole number"),
    ({"task_id": "task0", "ranking": {"a": {"rank": 1}}}, "whole number"),
    ({"task_id": "task0", "ranking": {"a": True}}, "whole number"),
    ({"task_id": "task0", "ranking": {"a": 1.5}}, "whole number"),
    ({"task_id": "task0", "ranking": {"a": 1}, "best_id": ["a"]}, "best_id"),
    ({"task_id": "task0", "ranking": {"a": 1}, "edited": {"text": "x"}}, "edited"),
    ({"task_id": "task0", "ranking": {"a": 1}, "nonce": 7}, "nonce"),
    (["task0"], "JSON object"),
    ("task0", "JSON object"),
]
RAW_BAD = [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"task_id": "task0", "ranking": {"a": NaN}}', "NaN is not JSON"),
    (b'{"task_id": "task0", "ranking": {"a": 1}', "invalid JSON"),
    (b'{"task_id": "\xff\xfe"}', "UTF-8"),
    (b"", "empty"),
    (b"null", "JSON object"),
    (b'{"task_id": "task0", "ranking": {"a": 1' + b"0" * 5000 + b"}}", "invalid JSON"),
]


@pytest.mark.parametrize("body,words", MALFORMED, ids=[f"json{i}" for i in range(len(MALFORMED))])
def test_malformed_fields_get_400(server, body, words):
    r = http_post(f"{server.base}/api/submit", json=body, headers=auth(server, "alice"))
    assert_one_line_error(r, 400, words)


@pytest.mark.parametrize("raw,words", RAW_BAD, ids=["deep", "nan", "truncated", "not-utf8", "empty", "null", "huge-int"])
def test_malformed_json_gets_400(server, raw, words):
    r = http_post(f"{server.base}/api/submit", content=raw,
                   headers={**auth(server, "alice"), "Content-Type": "application/json"})
    assert_one_line_error(r, 400, words)


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_broken_framing_and_huge_bodies_get_a_reply(server):
    head = (f"POST /api/submit HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.tokens['alice']}\r\nConnection: close\r\n")
    out = raw_request(server.port, (head + "Content-Length: twelve\r\n\r\n{}").encode())
    status, _, body = out.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400") and body.strip() and b"\n" not in body.strip()
    out = raw_request(server.port, (head + "Content-Length: 1, 2\r\n\r\n{}").encode())
    assert out.startswith(b"HTTP/1.1 400")
    out = raw_request(server.port, (head + "Content-Length: 900000000000\r\n\r\n{}").encode())  # declared, never sent
    assert out.startswith(b"HTTP/1.1 413") and b"larger than" in out
    h = {**auth(server, "alice"), "Content-Type": "application/json"}
    big = json.dumps({"task_id": "task0", "ranking": {"a": 1}, "edited": "x" * 3_000_000}).encode()
    assert_one_line_error(http_post(f"{server.base}/api/submit", content=big, headers=h), 413, "larger than")
    chunks = (b" " * 500_000 for _ in range(6))  # chunked: no Content-Length to refuse early
    assert_one_line_error(http_post(f"{server.base}/api/submit", content=chunks, headers=h), 413, "larger")
    assert http_get(f"{server.base}/api/next", headers=auth(server, "alice")).status_code == 200  # still serving


# ---------------------------------------------------------------- 100 simultaneous submissions, real server

def test_hundred_simultaneous_submissions_none_refused_lost_or_doubled(tmp_path):
    db, n = tmp_path / "ann.sqlite", 100
    store = Store(db)
    store.import_tasks(load_tasks(write_tasks(tmp_path / "tasks.jsonl")))
    tokens = {f"ann{k:03d}": store.add_annotator(f"ann{k:03d}") for k in range(n)}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "annotate", "serve", "--db", str(db), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # "annotation page: URL ..." once the socket listens
        assert line.startswith("annotation page: "), (line, (tmp_path / "server.log").read_text())
        base = line.split()[2].rstrip("/")

        def body(k: int) -> tuple[str, dict]:
            who, t = f"ann{k:03d}", k % 5
            ranks = {f"r{t}-{j}": 1 + (j + k) % 3 for j in range(3)}
            return who, {"task_id": f"task{t}", "ranking": keyed(f"task{t}", who, ranks), "nonce": f"n{k}",
                         "edited": f"edited by {who}" if k % 2 else None}

        async def fire() -> list:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=300, limits=limits) as c:
                async def one(k: int):
                    who, b = body(k)
                    try:
                        r = await c.post(f"{base}/api/submit", json=b, headers={"Authorization": f"Bearer {tokens[who]}"})
                        return k, r.status_code, r.json() if r.status_code == 200 else r.text
                    except httpx.HTTPError as e:  # refused, reset, timed out
                        return k, type(e).__name__, str(e)
                return await asyncio.gather(*(one(k) for k in range(n)))

        results = asyncio.run(fire())
        failed = [r for r in results if r[1] != 200]
        assert not failed, f"{len(failed)} of {n} not stored: {failed[:5]}"
        ids = [r[2]["submission"] for r in results]
        assert len(set(ids)) == n and not any(r[2]["retry"] for r in results)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean shutdown: what was acknowledged must already be on disk
        proc.wait(60)
        log.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = conn.execute("SELECT id, annotator, task_id, ranking, edited FROM submissions").fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)  # nothing lost, nothing doubled
    for sid, who, task, ranking, edited in rows:
        k = int(who[3:])
        assert task == f"task{k % 5}" and json.loads(ranking) == {f"r{k % 5}-{j}": 1 + (j + k) % 3 for j in range(3)}
        assert edited == (f"edited by {who}" if k % 2 else None)
    st = export(db, tmp_path / "out", "all")
    assert st["demonstrations"] == n and st["edited"] == n // 2 and st["preferences"] == 3 * n
    assert st["annotators"] == n and st["agreement"]["tasks_with_2plus_annotators"] == 5
    st = export(db, tmp_path / "out2", "best_worst")
    assert st["preferences"] == n and all(p["margin"] == 2 for p in read_records(tmp_path / "out2" / "preferences.jsonl"))


# ---------------------------------------------------------------- CLI, old databases, the recipe stage

def test_cli_add_annotator_export_and_stage(tmp_path, capsys):
    db = tmp_path / "a.sqlite"
    Store(db).import_tasks(load_tasks(write_tasks(tmp_path / "t.jsonl", n=2)))
    assert cli_main(["annotate", "add-annotator", "--db", str(db), "zoe"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert Store(db).annotator_for(token) == "zoe" and f"?token={token}" in err
    assert cli_main(["annotate", "add-annotator", "--db", str(db), "zoe"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line, no traceback
    Store(db).submit("zoe", {"task_id": "task1", "ranking": keyed("task1", "zoe", {"r1-0": 2, "r1-1": 1, "r1-2": 2}),
                             "edited": "better"})
    assert cli_main(["annotate", "export", "--db", str(db), "--out", str(tmp_path / "x"), "--pairs", "best_worst"]) == 0
    assert json.loads(capsys.readouterr().out)["preferences"] == 2
    (tmp_path / "junk.sqlite").write_text("not a database")
    assert cli_main(["annotate", "export", "--db", str(tmp_path / "junk.sqlite"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "not an annotations database" in err and err.strip().count("\n") == 0
    from posttrain.stages import recipe_from_dict

    data = {"output_dir": str(tmp_path / "run"), "stages": [{"kind": "annotation_export", "db": str(db), "pairs": "all"}]}
    m = recipe_from_dict(data, tmp_path / "r.yaml").run()["annotation_export"]["summary"]
    assert m["demonstrations"] == 1 and m["preferences"] == 2
    assert read_records(tmp_path / "run" / "annotation_export" / "demonstrations.jsonl")[0]["messages"][-1]["content"] == "better"


def test_add_annotator_command_tokens_work_on_a_running_server(server, tmp_path):
    """`posttrain annotate add-annotator`, the real command in its own process, against the database a running
    server uses: the printed token and sign-in link work at once (no restart), --rotate retires the old token
    on the live server, and refusals are one line."""
    def add(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "posttrain.cli", "annotate", "add-annotator", "--db",
                               str(tmp_path / "ann.sqlite"), "--url", server.url, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=600, check=False)

    def whoami(token: str) -> httpx.Response:
        return http_get(f"{server.base}/api/next", headers={"Authorization": f"Bearer {token}"})

    p = add("carol")
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    assert len(token) >= 32 and "\n" not in token and f"{server.url}?token={token}" in p.stderr
    r = whoami(token)
    assert r.status_code == 200 and r.json()["annotator"] == "carol" and r.json()["task"]["id"] == "task0"
    with httpx.Client(timeout=TIMEOUT) as c:  # the printed link signs in
        r = c.get(f"{server.base}/", params={"token": token})
        assert r.status_code == 303 and c.get(f"{server.base}/api/next").json()["annotator"] == "carol"
    body = {"task_id": "task0", "ranking": keyed("task0", "carol", {"r0-0": 1, "r0-1": 2, "r0-2": 3})}
    r = http_post(f"{server.base}/api/submit", json=body, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["ok"], r.text
    rot = add("--rotate", "carol")
    assert rot.returncode == 0, rot.stderr
    new = rot.stdout.strip()
    assert new != token and whoami(token).status_code == 401 and whoami(new).json()["annotator"] == "carol"
    for args, words in ((["carol"], "already exists"), (["--rotate", "dave"], "no annotator 'dave'"),
                        (["tab\there"], "1-100 printable")):
        p = add(*args)
        assert p.returncode == 2 and "Traceback" not in p.stderr and not p.stdout.strip(), p.stderr
        assert p.stderr.strip().count("\n") == 0 and words in p.stderr, p.stderr
    assert http_get(f"{server.base}/api/stats", headers={"Authorization": f"Bearer {new}"}).json()["submissions"] == 1


def test_database_of_the_previous_version_is_upgraded(tmp_path):
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)  # the schema before tokens and nonces
    conn.executescript("""
        CREATE TABLE tasks (id TEXT PRIMARY KEY, position INTEGER NOT NULL, data TEXT NOT NULL);
        CREATE TABLE submissions (id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, annotator TEXT NOT NULL,
            created REAL NOT NULL, ranking TEXT NOT NULL, best_id TEXT NOT NULL, edited TEXT, comment TEXT);""")
    task = load_tasks(write_tasks(tmp_path / "t.jsonl", n=1))[0]
    conn.execute("INSERT INTO tasks VALUES ('task0', 0, ?)", (json.dumps(task),))
    conn.execute("INSERT INTO submissions (task_id, annotator, created, ranking, best_id) VALUES "
                 "('task0', 'old', 1.0, '{\"r0-0\": 1, \"r0-1\": 2, \"r0-2\": 2}', 'r0-0')")
    conn.commit()
    conn.close()
    store = Store(db)
    tok = store.add_annotator("new")
    assert store.annotator_for(tok) == "new"
    store.submit("new", {"task_id": "task0", "ranking": keyed("task0", "new", {"r0-0": 1, "r0-1": 2, "r0-2": 3}),
                         "nonce": "x"})
    st = export(db, tmp_path / "out")
    assert st["per_annotator"] == {"new": 1, "old": 1} and st["agreement"]["pairwise_agreement"] == 1.0


# ---------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium); "
                                             "scripts/install_browser.sh installs it")
def test_browser_rank_edit_submit_export(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
    tasks = tmp_path / "tasks.jsonl"
    with open(tasks, "w") as f:
        f.write(json.dumps({"id": "t-sea", "prompt": [{"role": "user", "content": "Write a two-line poem about the sea. "
                                                                                 + XSS}],
                            "responses": [{"id": "good", "text": "Waves fold silver light,\nthe tide keeps time all night.",
                                           "label": "model-A"},
                                          {"id": "meh", "text": "The sea is big and wet. " + XSS, "label": "model-B"},
                                          {"id": "bad", "text": "sea sea sea sea", "label": "model-C"}]}) + "\n")
        f.write(json.dumps({"id": "t-two", "prompt": [{"role": "user", "content": "Name a prime number."}],
                            "responses": [{"id": "p1", "text": "7"}, {"id": "p2", "text": "9"}]}) + "\n")
    srv = AnnotationServer(tmp_path / "ann.sqlite", tasks, "127.0.0.1", 0).start()
    token = srv.store.add_annotator("alice")
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(120_000)  # Playwright's 30 s default is short for chromium on a loaded machine
            page.goto(srv.url)  # no token yet: the page asks for one
            page.wait_for_selector("#signin:not(.hidden)")
            page.goto(srv.link(token))  # the link sets the cookie and redirects to the bare page
            page.wait_for_selector(".response")
            assert page.url == srv.url and page.inner_text("#who") == "alice"
            assert "two-line poem" in page.inner_text("#instruction")
            assert XSS in page.inner_text("#instruction") and XSS in page.inner_text("#responses")  # shown as text
            assert page.evaluate("window.__xss") is None  # and never run
            assert "model-" not in page.content() and "good" not in page.inner_text("#responses")  # blind
            rank = lambda text, r: page.locator(".response", has_text=text).locator("select.rank").select_option(r)  # noqa: E731
            rank("Waves fold", "1")
            rank("big and wet", "2")
            rank("sea sea sea", "3")
            assert page.input_value("#edit").startswith("Waves fold silver light")
            page.fill("#edit", "Waves fold silver light,\nthe tide keeps time all through the night.")
            shot = tmp_path / "annotate.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("POSTTRAIN_UPDATE_DOCS"):  # refresh the README picture on demand only
                shutil.copy(shot, REPO / "docs" / "annotate.png")
            page.click("#submit")
            # locator waits, not wait_for_function: the page's CSP forbids string eval, Playwright's included
            page.locator("#instruction", has_text="prime").wait_for()
            rank("7", "1")  # second task: a tie is allowed
            rank("9", "1")
            page.click("#submit")
            page.locator("#instruction", has_text="No more tasks").wait_for()
            assert page.inner_text("#progress") == "2 of 2 done by you"
            browser.close()
    finally:
        srv.shutdown()
    st = export(tmp_path / "ann.sqlite", tmp_path / "out", "all")
    assert st["submissions"] == 2 and st["annotators"] == 1
    demos = {d["meta"]["task_id"]: d for d in read_records(tmp_path / "out" / "demonstrations.jsonl")}
    assert demos["t-sea"]["messages"][-1]["content"].endswith("all through the night.") and demos["t-sea"]["meta"]["edited"]
    assert demos["t-sea"]["meta"]["annotator"] == "alice" and demos["t-sea"]["meta"]["label"] == "model-A"
    assert demos["t-two"]["messages"][-1]["content"] in ("7", "9") and not demos["t-two"]["meta"]["edited"]
    prefs = read_records(tmp_path / "out" / "preferences.jsonl")
    assert sorted((p["meta"]["chosen_id"], p["meta"]["rejected_id"]) for p in prefs) == [
        ("good", "bad"), ("good", "meh"), ("meh", "bad")]  # the tie gave no pair
