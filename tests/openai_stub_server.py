"""A small OpenAI-compatible chat-completions server for crash and resume tests, run as its own process.

Usage: ``python tests/openai_stub_server.py --log LOG --ready READY [--port P] [--crash-after K] [--mode M]``

* ``POST /v1/chat/completions`` answers ``n`` choices of deterministic text derived from the prompt
  (so a resumed run gives what an uninterrupted one would): an evolve-style prompt (the instruction
  between ``<<<`` and ``>>>``) gets the instruction with a constraint added; anything else gets
  ``"Response J to: LAST USER MESSAGE"``. ``GET /v1/models`` lists the one served model.
* Every answered completion request appends one JSON line to LOG: ``{"hash": sha1 of the messages,
  "user": last user message, "n", "seed", "status"}``, written after the response has been flushed,
  so the log counts exactly what the client could have received.
* ``--crash-after K``: after answering K requests the process dies with ``os._exit`` (no clean
  shutdown, like a killed or OOM-ed server); a request that arrives after that gets no answer.
* ``--mode fail``: every completion request gets HTTP 500 (a broken server that is still up);
  ``--mode empty``: every choice is empty text (a wrong chat template, say); ``ok`` (default): text.
* READY gets the bound port once the socket listens (written atomically), so a test can poll for it.

Requests are handled one at a time (a lock): the crash point and the log order are then exact,
whatever the machine's load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "stub-model"


def prompt_hash(messages: list[dict]) -> str:
    """The hash the log records for a prompt (tests compute the same from the prompts they expect)."""
    return hashlib.sha1(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def reply_text(messages: list[dict], j: int) -> str:
    """The deterministic completion ``j`` of a prompt."""
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    m = re.search(r"<<<\n?(.*?)\n?>>>", user, re.S)
    if m:  # stage evolve's rewrite request: a changed, plausible instruction
        return f"{m.group(1).strip()} Answer in exactly three short bullet points."
    return f"Response {j} to: {user}"


class State:
    """What the handler threads share: the request counter, the limits and the log file."""

    lock = threading.Lock()
    answered = 0
    crash_after: int | None = None
    mode = "ok"
    log_path = ""


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 (one request per connection): a crash never leaves a half-used keep-alive connection."""

    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        """``/v1/models``: the served model."""
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        """``/v1/chat/completions``: one answer per request, serialised by the lock."""
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        body = json.loads(raw)
        msgs = body["messages"]
        with State.lock:
            if State.crash_after is not None and State.answered >= State.crash_after:
                os._exit(3)  # already past the crash point: this request is never answered
            n = int(body.get("n") or 1)
            if State.mode == "fail":
                status = 500
                self._send(500, {"error": {"message": "stub server: internal error (mode fail)"}})
            else:
                status = 200
                self._send(200, {"id": "stub", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": j, "message": {"role": "assistant",
                                                                      "content": "" if State.mode == "empty"
                                                                      else reply_text(msgs, j)},
                                              "finish_reason": "stop"} for j in range(n)]})
            user = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), "")
            with open(State.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"hash": prompt_hash(msgs), "user": user, "n": n, "seed": body.get("seed"),
                                    "status": status}, ensure_ascii=False) + "\n")
            State.answered += 1
            if State.crash_after is not None and State.answered >= State.crash_after:
                sys.stdout.flush()
                os._exit(3)  # the crash: no shutdown, open connections are dropped

    def log_message(self, *a: object) -> None:
        """Quiet: the request log file is the record."""


class Server(ThreadingHTTPServer):
    """allow_reuse_address (inherited): a restart binds the crashed server's port at once."""

    request_queue_size = 64  # listen backlog: the client opens up to max_concurrency connections at once
    daemon_threads = True


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, bind, announce the port in READY, serve forever."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--mode", choices=["ok", "fail", "empty"], default="ok")
    a = p.parse_args(argv)
    State.crash_after, State.mode, State.log_path = a.crash_after, a.mode, a.log
    srv = Server(("127.0.0.1", a.port), Handler)
    tmp = a.ready + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.server_port))
    os.replace(tmp, a.ready)
    srv.serve_forever()


if __name__ == "__main__":
    main()
