"""Annotation app: task checks, ranking pairs, concurrent submissions, token, export, and a real browser run."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from data_synthesis.annotate_app import AnnotationServer, export, load_tasks, ranking_pairs
from posttrain.cli import main as cli_main
from posttrain.core.records import RecordError, read_records
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def write_tasks(path: Path, n: int = 5, k: int = 3) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "id": f"task{i}", "prompt": [{"role": "user", "content": f"Instruction number {i}: explain tides."}],
                "source": "respond",
                "responses": [{"id": f"r{i}-{j}", "text": f"Response {j} to instruction {i}.", "label": f"gen{j % 2}"}
                              for j in range(k)]}) + "\n")
    return path


@pytest.fixture()
def server(tmp_path):
    srv = AnnotationServer(tmp_path / "ann.sqlite", write_tasks(tmp_path / "tasks.jsonl"), "127.0.0.1", free_port())
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_load_tasks_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"id": "a", "prompt": "hi", "responses": [{"text": "only one"}]}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl: record 1 \(id a\): 'responses' must be a list of at least 2"):
        load_tasks(p)
    p.write_text(json.dumps({"id": "a", "prompt": "hi", "responses": [{"id": "x", "text": "1"}, {"id": "x", "text": "2"}]}))
    with pytest.raises(RecordError, match="repeated"):
        load_tasks(p)


def test_ranking_pairs_all_and_best_worst_with_ties():
    order = ["a", "b", "c", "d"]
    ranks = {"a": 2, "b": 1, "c": 2, "d": 3}
    assert ranking_pairs(order, ranks, "all", "b") == [("a", "d"), ("b", "a"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert ranking_pairs(order, ranks, "best_worst", "b") == [("b", "d")]
    tie = {"a": 1, "b": 1, "c": 1, "d": 1}
    assert ranking_pairs(order, tie, "all", "a") == [] and ranking_pairs(order, tie, "best_worst", "a") == []


def test_submit_validation(server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    nxt = httpx.get(f"{base}/api/next", params={"annotator": "ann"}).json()
    task = nxt["task"]
    assert nxt["total"] == 5 and task["id"] == "task0" and "label" not in task["responses"][0]
    ids = [r["id"] for r in task["responses"]]
    bad = httpx.post(f"{base}/api/submit", json={"task_id": "task0", "annotator": "ann", "ranking": {ids[0]: 1}})
    assert bad.status_code == 400 and "every response" in bad.json()["error"]
    bad = httpx.post(f"{base}/api/submit", json={"task_id": "nope", "annotator": "ann", "ranking": {}})
    assert bad.status_code == 400 and "no task" in bad.json()["error"]
    bad = httpx.post(f"{base}/api/submit", json={"task_id": "task0", "annotator": "ann",
                                                  "ranking": {i: 1 + n for n, i in enumerate(ids)}, "best_id": ids[2]})
    assert bad.status_code == 400 and "best_id" in bad.json()["error"]
    ok = httpx.post(f"{base}/api/submit", json={"task_id": "task0", "annotator": "ann",
                                                 "ranking": {i: 1 + n for n, i in enumerate(ids)}})
    assert ok.status_code == 200 and ok.json()["ok"]
    assert httpx.get(f"{base}/api/next", params={"annotator": "ann"}).json()["task"]["id"] == "task1"
    assert httpx.get(f"{base}/api/next", params={"annotator": "other"}).json()["task"]["id"] == "task1"  # fewest first


def test_twenty_concurrent_submissions_all_stored(server, tmp_path):
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def one(k: int) -> int:
        task = f"task{k % 5}"
        ranking = {f"r{k % 5}-{j}": 1 + (j + k) % 3 for j in range(3)}
        r = httpx.post(f"{base}/api/submit", timeout=60,
                       json={"task_id": task, "annotator": f"annotator{k}", "ranking": ranking,
                             "edited": f"edited by {k}" if k % 2 else None})
        assert r.status_code == 200, r.text
        return r.json()["submission"]

    with ThreadPoolExecutor(20) as ex:
        ids = list(ex.map(one, range(20)))
    assert len(set(ids)) == 20
    rows = sqlite3.connect(tmp_path / "ann.sqlite").execute("SELECT annotator, created FROM submissions").fetchall()
    assert sorted(a for a, _ in rows) == sorted(f"annotator{k}" for k in range(20)) and all(c > 0 for _, c in rows)
    assert sqlite3.connect(tmp_path / "ann.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    st = export(tmp_path / "ann.sqlite", tmp_path / "out", "all")
    assert st["demonstrations"] == 20 and st["edited"] == 10 and st["preferences"] == 60  # 3 pairs per ranking
    demos = read_records(tmp_path / "out" / "demonstrations.jsonl")
    d1 = next(d for d in demos if d["meta"]["annotator"] == "annotator1")
    assert d1["messages"][-1] == {"role": "assistant", "content": "edited by 1"} and d1["meta"]["edited"]
    d0 = next(d for d in demos if d["meta"]["annotator"] == "annotator0")
    assert d0["messages"][-1]["content"] == "Response 0 to instruction 0." and not d0["meta"]["edited"]
    st = export(tmp_path / "ann.sqlite", tmp_path / "out2", "best_worst")
    assert st["preferences"] == 20
    prefs = read_records(tmp_path / "out2" / "preferences.jsonl")
    assert all(p["margin"] == 2 for p in prefs)


def test_latest_submission_counts(server, tmp_path):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    for ranks in ({"r0-0": 1, "r0-1": 2, "r0-2": 3}, {"r0-0": 3, "r0-1": 1, "r0-2": 1}):
        assert httpx.post(f"{base}/api/submit", json={"task_id": "task0", "annotator": "a", "ranking": ranks}).status_code == 200
    st = export(tmp_path / "ann.sqlite", tmp_path / "out", "all")
    assert st["submissions"] == 2 and st["latest_submissions"] == 1 and st["preferences"] == 2
    demo = read_records(tmp_path / "out" / "demonstrations.jsonl")[0]
    assert demo["meta"]["response_id"] == "r0-1"  # first of the tied best, in task order


def test_token_guards_every_request(tmp_path):
    srv = AnnotationServer(tmp_path / "a.sqlite", write_tasks(tmp_path / "t.jsonl"), "127.0.0.1", free_port(), token="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert httpx.get(f"{base}/").status_code == 401
        assert httpx.get(f"{base}/api/next", params={"annotator": "x"}).status_code == 401
        assert httpx.post(f"{base}/api/submit", json={}).status_code == 401
        assert httpx.get(f"{base}/", params={"token": "wrong"}).status_code == 401
        page = httpx.get(f"{base}/", params={"token": "s3cret"})
        assert page.status_code == 200 and "annotate_token=s3cret" in page.headers["set-cookie"]
        assert httpx.get(f"{base}/api/next", params={"annotator": "x"}, headers={"X-Annotate-Token": "s3cret"}).status_code == 200
        assert srv.url.endswith("?token=s3cret") and srv.server_address[0] == "127.0.0.1"
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_export_and_stage(tmp_path, capsys):
    srv = AnnotationServer(tmp_path / "a.sqlite", write_tasks(tmp_path / "t.jsonl", n=2), "127.0.0.1", free_port())
    srv.server_close()  # only the database import is needed here
    from data_synthesis.annotate_app import connect, submit

    conn = connect(tmp_path / "a.sqlite")
    submit(conn, {"task_id": "task1", "annotator": "z", "ranking": {"r1-0": 2, "r1-1": 1, "r1-2": 2}, "edited": "better"})
    conn.close()
    assert cli_main(["annotate", "export", "--db", str(tmp_path / "a.sqlite"), "--out", str(tmp_path / "x"),
                     "--pairs", "best_worst"]) == 0
    assert json.loads(capsys.readouterr().out)["preferences"] == 2
    from posttrain.stages import load_recipe, recipe_from_dict

    data = {"output_dir": str(tmp_path / "run"),
            "stages": [{"kind": "annotation_export", "db": str(tmp_path / "a.sqlite"), "pairs": "all"}]}
    m = recipe_from_dict(data, tmp_path / "r.yaml").run()["annotation_export"]["summary"]
    assert m["demonstrations"] == 1 and m["preferences"] == 2
    assert read_records(tmp_path / "run" / "annotation_export" / "demonstrations.jsonl")[0]["messages"][-1]["content"] == "better"


# ---------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium); "
                                             "scripts/install_browser.sh installs it")
def test_browser_rank_edit_submit_export(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
    tasks = tmp_path / "tasks.jsonl"
    with open(tasks, "w") as f:
        f.write(json.dumps({"id": "t-sea", "prompt": [{"role": "user", "content": "Write a two-line poem about the sea."}],
                            "responses": [{"id": "good", "text": "Waves fold silver light,\nthe tide keeps time all night."},
                                          {"id": "meh", "text": "The sea is big and wet."},
                                          {"id": "bad", "text": "sea sea sea sea"}]}) + "\n")
        f.write(json.dumps({"id": "t-two", "prompt": [{"role": "user", "content": "Name a prime number."}],
                            "responses": [{"id": "p1", "text": "7"}, {"id": "p2", "text": "9"}]}) + "\n")
    srv = AnnotationServer(tmp_path / "ann.sqlite", tasks, "127.0.0.1", free_port(), token="tok")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(srv.url)
            page.fill("#annotator", "alice")
            page.press("#annotator", "Enter")
            page.wait_for_selector(".response")
            assert "two-line poem" in page.inner_text("#instruction")
            page.select_option("select.rank[data-id=good]", "1")
            page.select_option("select.rank[data-id=meh]", "2")
            page.select_option("select.rank[data-id=bad]", "3")
            assert page.input_value("#edit").startswith("Waves fold silver light")
            page.fill("#edit", "Waves fold silver light,\nthe tide keeps time all through the night.")
            shot = tmp_path / "annotate.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("POSTTRAIN_UPDATE_DOCS"):  # refresh the README picture on demand only
                shutil.copy(shot, REPO / "docs" / "annotate.png")
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('Saved')")
            page.wait_for_function("document.getElementById('instruction').textContent.includes('prime')")
            # second task: a tie is allowed
            page.select_option("select.rank[data-id=p1]", "1")
            page.select_option("select.rank[data-id=p2]", "1")
            page.click("#submit")
            page.wait_for_function("document.getElementById('instruction').textContent.includes('No more tasks')")
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    st = export(tmp_path / "ann.sqlite", tmp_path / "out", "all")
    assert st["submissions"] == 2 and st["annotators"] == 1
    demos = {d["meta"]["task_id"]: d for d in read_records(tmp_path / "out" / "demonstrations.jsonl")}
    assert demos["t-sea"]["messages"][-1]["content"].endswith("all through the night.") and demos["t-sea"]["meta"]["edited"]
    assert demos["t-sea"]["meta"]["annotator"] == "alice"
    assert demos["t-two"]["messages"][-1]["content"] in ("7", "9") and not demos["t-two"]["meta"]["edited"]
    prefs = read_records(tmp_path / "out" / "preferences.jsonl")
    assert sorted((p["meta"]["chosen_id"], p["meta"]["rejected_id"]) for p in prefs) == [
        ("good", "bad"), ("good", "meh"), ("meh", "bad")]  # the tie gave no pair
