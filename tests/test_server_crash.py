"""Kill the server mid-run (issue #15): a single-call synthesis stage loses at most one chunk and resumes
without re-sending committed work.

The sampler is the real ``openai`` backend, talking to ``tests/openai_stub_server.py`` (its own
process) that answers deterministic text, logs every answered request and dies hard
(``os._exit``) after K answers. The stage runs through the real CLI
(``python -m posttrain.cli run recipe.yaml``) in a subprocess:

1. the first run fails when the server dies: exit 2, one ``error:`` line naming the server, no
   traceback; the retries before giving up are logged (attempt, wait, error);
2. the step cache holds exactly the chunks completed before the crash, so answered minus
   committed requests is at most one chunk;
3. against a restarted server the same command succeeds, asks only for prompts not committed
   (each once, with the seeds of the first run) and writes every prompt exactly once.

Also: a server that answers every request with HTTP 500, or with empty text, makes the stage fail
with one line and write no output (``min_success_rate``), instead of writing an empty file.

Nothing here waits a fixed time: the server announces its port in a file the test polls for,
with generous deadlines, and each CLI run is a plain subprocess with a long timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain.core.records import read_records

pytestmark = pytest.mark.slow  # six CLI runs (a fresh interpreter each)

ROOT = Path(__file__).resolve().parents[1]
STUB = Path(__file__).with_name("openai_stub_server.py")
N, CHUNK, CRASH_AFTER = 40, 8, 19  # the crash lands mid-chunk: chunk 3 has 3 of 8 answers
SUFFIX = " Answer in exactly three short bullet points."  # what the stub adds to an evolve request's instruction


def instruction(i: int) -> str:
    return f"Explain topic number {i} to a curious twelve-year-old."


class Stub:
    """One process of the stub server; ``log`` holds one JSON row per answered request."""

    def __init__(self, tmp: Path, name: str, port: int = 0, crash_after: int | None = None, mode: str = "ok"):
        self.log, ready = tmp / f"{name}.requests.jsonl", tmp / f"{name}.port"
        self.log.touch()
        cmd = [sys.executable, str(STUB), "--port", str(port), "--log", str(self.log), "--ready", str(ready),
               "--mode", mode]
        if crash_after is not None:
            cmd += ["--crash-after", str(crash_after)]
        self.err = open(tmp / f"{name}.stderr", "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err)
        deadline = time.monotonic() + 120  # a loaded machine starts an interpreter slowly
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stub server did not start: {(tmp / f'{name}.stderr').read_text()}")
            time.sleep(0.05)
        self.port = int(ready.read_text())

    def rows(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        self.err.close()


@pytest.fixture()
def stubs():
    started: list[Stub] = []

    def start(*a, **kw) -> Stub:
        started.append(Stub(*a, **kw))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def write_recipe(tmp: Path, port: int, stage: dict) -> Path:
    inp = tmp / "instructions.jsonl"
    with open(inp, "w") as f:
        for i in range(N):
            f.write(json.dumps({"id": f"i{i:02d}", "prompt": [{"role": "user", "content": instruction(i)}]}) + "\n")
    (tmp / "served-model").mkdir(exist_ok=True)  # a model folder to name; the server is what answers
    data = {"output_dir": str(tmp / "run"), "seed": 0, "model": {"path": str(tmp / "served-model")},
            "sampler": {"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                        "served_model_name": "stub-model", "max_concurrency": 4, "max_retries": 2,
                        "timeout_s": 120, "request_token_ids": False},
            "stages": [{"input": str(inp), "chunk_size": CHUNK, **stage}]}
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def run_cli(recipe: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def assert_one_line_failure(p: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line containing ``words``; returns that line."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), p.stderr[-3000:]
    return errors[0]


# What each stage sends and keeps: the instruction a request was about, the instruction a cached
# completion answers, the step cache, and the instructions found in the final records.
STAGES = {
    "respond": {
        "stage": {"kind": "respond", "generators": [{"label": "hot", "sampling": {"n": 2, "temperature": 1.0,
                                                                                  "max_tokens": 32}}]},
        "asked": lambda user: user,
        "answered": lambda text: text.split(" to: ", 1)[1],
        "cache": "steps/gen-hot.jsonl",
    },
    "evolve": {
        "stage": {"kind": "evolve", "rounds": 1, "sampling": {"temperature": 0.7, "max_tokens": 64}},
        "asked": lambda user: re.search(r"<<<\n(.*?)\n>>>", user, re.S).group(1),
        "answered": lambda text: text.removesuffix(SUFFIX),
        "cache": "steps/round1.jsonl",
    },
}


def final_outputs(stage: str, out: Path) -> list[str]:
    """The instruction of every record the stage wrote for the model's outputs (one per prompt expected)."""
    if stage == "respond":
        tasks = read_records(out / "tasks.jsonl")
        for t in tasks:  # each task holds the two deterministic answers to its own instruction
            ins = t["prompt"][-1]["content"]
            assert [r["text"] for r in t["responses"]] == [f"Response {j} to: {ins}" for j in range(2)]
        return [t["prompt"][-1]["content"] for t in tasks]
    recs = read_records(out / "records.jsonl")
    evolved = [r for r in recs if r["meta"]["evolve"]["level"] == 1]
    assert len(recs) == 2 * N and not (out / "failed.jsonl").read_text().strip()
    by_id = {r["id"]: r for r in recs}
    for r in evolved:  # the child is its parent's instruction with the stub's constraint
        parent = by_id[r["meta"]["evolve"]["parent_id"]]["prompt"][-1]["content"]
        assert r["prompt"][-1]["content"] == parent + SUFFIX
    return [r["prompt"][-1]["content"].removesuffix(SUFFIX) for r in evolved]


@pytest.mark.parametrize("stage", list(STAGES))
def test_server_killed_mid_run_loses_at_most_one_chunk_and_resume_resends_nothing(tmp_path, stubs, stage):
    spec = STAGES[stage]
    first = stubs(tmp_path, "first", crash_after=CRASH_AFTER)
    recipe = write_recipe(tmp_path, first.port, spec["stage"])
    out = tmp_path / "run" / stage

    # 1. the server dies after CRASH_AFTER answers: the run fails with one line
    p = run_cli(recipe)
    line = assert_one_line_failure(p, f"127.0.0.1:{first.port}/v1", "gave up after 3 attempts")
    assert first.proc.wait(60) == 3  # the stub really crashed (os._exit), it was not shut down
    # each retry is logged with its attempt, wait and error; the failed chunk says what is committed
    retries = [x for x in p.stderr.splitlines() if "failed (" in x and "retrying in" in x]
    assert retries and all(re.search(r"attempt [12]/3 failed \(\w+(: .+)?\); retrying in \d+\.\ds", x) for x in retries), \
        p.stderr[-3000:]
    assert re.search(rf"chunk 3/5 \({CHUNK} items\) failed: OpenAIServerError: .*; 16 of {N} items are committed",
                     p.stderr), p.stderr[-3000:]
    assert not (out / "manifest.json").exists() and not (out / "tasks.jsonl").exists()
    assert not (out / "records.jsonl").exists(), "nothing is written before every chunk is done"

    # 2. committed = every chunk completed before the crash; at most one chunk of answers lost
    answered = first.rows()
    assert len(answered) == CRASH_AFTER and all(r["status"] == 200 for r in answered), line
    cache = [json.loads(x) for x in (out / spec["cache"]).read_text().splitlines()]
    committed = [spec["answered"](row["v"][0]["text"]) for row in cache]
    assert len(committed) == len(set(committed)) == (len(answered) // CHUNK) * CHUNK == 16
    asked_first = [spec["asked"](r["user"]) for r in answered]
    assert set(committed) <= set(asked_first) and len(asked_first) - len(committed) <= CHUNK
    seeds_first = {spec["asked"](r["user"]): r["seed"] for r in answered}

    # 3. restart the server on the same port (no crash), run the same command: only the rest is asked for
    second = stubs(tmp_path, "second", port=first.port)
    p = run_cli(recipe)
    assert p.returncode == 0, p.stderr[-3000:]
    asked_again = [spec["asked"](r["user"]) for r in second.rows()]
    assert not set(asked_again) & set(committed), "a committed prompt was sent again"
    assert len(asked_again) == len(set(asked_again)) == N - len(committed)  # each missing prompt once
    assert set(asked_again) | set(committed) == {instruction(i) for i in range(N)}
    lost = set(asked_first) - set(committed)  # answered before the crash, never committed: asked again ...
    assert lost and lost <= set(asked_again)
    resent = {spec["asked"](r["user"]): r["seed"] for r in second.rows()}
    assert all(resent[x] == seeds_first[x] for x in lost)  # ... with the same seed: the same completions
    got = final_outputs(stage, out)
    assert sorted(got) == sorted(instruction(i) for i in range(N))  # every prompt exactly once
    assert json.loads((out / "manifest.json").read_text())["summary"]


@pytest.mark.parametrize("mode,words", [
    ("fail", ["gave up after 3 attempts", "HTTP 500"]),
    ("empty", ["only 0 of 80 responses non-empty", "min_success_rate=0.05", "nothing was written"]),
], ids=["http500", "empty-text"])
def test_a_failing_server_stops_the_stage_with_one_line_and_no_output(tmp_path, stubs, mode, words):
    srv = stubs(tmp_path, mode, mode=mode)
    recipe = write_recipe(tmp_path, srv.port, STAGES["respond"]["stage"])
    p = run_cli(recipe)
    assert_one_line_failure(p, *words)
    out = tmp_path / "run" / "respond"
    assert not (out / "tasks.jsonl").exists() and not (out / "manifest.json").exists()
    rows = srv.rows()
    if mode == "fail":
        # only the first chunk is tried: every started request 3 times (2 retries); once one gives up, the
        # chunk's requests not yet started are cancelled (at least max_concurrency=4 had started)
        assert all(r["status"] == 500 for r in rows) and len(rows) % 3 == 0 and 3 * 4 <= len(rows) <= 3 * CHUNK
        assert {r["user"] for r in rows} <= {instruction(i) for i in range(CHUNK)}
        assert p.stderr.count("failed (HTTP 500: ") == len(rows) // 3 * 2
        assert not (out / "steps" / "gen-hot.jsonl").read_text().strip()  # nothing committed
    else:  # every prompt answered (empty): cached, so lowering the floor needs no new requests
        assert len(rows) == N and all(r["status"] == 200 for r in rows)
        assert len((out / "steps" / "gen-hot.jsonl").read_text().splitlines()) == N
