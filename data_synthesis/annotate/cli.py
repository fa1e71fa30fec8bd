"""``posttrain annotate serve | add-annotator | export``.

Input: command-line arguments (a database path, a tasks file, a bind address, an annotator
name, an output folder). Output: a running server (serve), a token on stdout (add-annotator),
or the export files plus their stats as one JSON line on stdout (export). The server module
(Starlette, uvicorn) is imported only by ``serve``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from data_synthesis.annotate.export import export
from data_synthesis.annotate.store import Store

log = logging.getLogger("posttrain.annotate")


def _cmd_serve(a: argparse.Namespace) -> int:
    from data_synthesis.annotate.server import LOOPBACK, AnnotationServer

    srv = AnnotationServer(a.db, a.tasks, a.host, a.port, a.allow_host)
    if a.host not in LOOPBACK:
        log.warning("annotate: listening on %s: tokens travel in clear over http; put a TLS proxy in front "
                    "for untrusted networks", a.host)
    if not srv.store.annotators():
        log.warning("annotate: no annotators yet; add one with: posttrain annotate add-annotator --db %s NAME", a.db)
    print(f"annotation page: {srv.url}  (hosts: {', '.join(sorted(srv.allowed))}; Ctrl-C to stop)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a graceful stop
        pass
    return 0


def _cmd_add(a: argparse.Namespace) -> int:
    token = Store(a.db).add_annotator(a.name, rotate=a.rotate)
    print(token)
    print(f"annotator {a.name.strip()!r}: token above (only its hash is stored; it is not shown again).\n"
          f"sign-in link: {a.url.rstrip('/')}/?token={token}", file=sys.stderr)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    print(json.dumps(export(a.db, a.out, a.pairs)))
    return 0


def add_cli(sub) -> None:
    """Add ``posttrain annotate serve|add-annotator|export`` to the command line."""
    p = sub.add_parser("annotate", help="ranking web app for human annotation, and its export")
    asub = p.add_subparsers(dest="annotate_cmd", required=True)
    s = asub.add_parser("serve", help="serve the ranking page (binds 127.0.0.1 unless --host says otherwise)")
    s.add_argument("tasks", nargs="?", help="tasks.jsonl of stage respond (optional when the db already has tasks)")
    s.add_argument("--db", required=True, help="SQLite file for tasks, annotators and submissions (created if missing)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765, help="port (0: any free port; the page address is printed)")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another host name the page may be reached under (Host header), e.g. behind a proxy; "
                        "repeatable")
    s.set_defaults(fn=_cmd_serve)
    t = asub.add_parser("add-annotator", help="register an annotator and print their token (shown once)")
    t.add_argument("name")
    t.add_argument("--db", required=True)
    t.add_argument("--rotate", action="store_true", help="issue a new token for an existing annotator "
                                                         "(the old one stops working)")
    t.add_argument("--url", default="http://127.0.0.1:8765/", help="server address used in the printed link")
    t.set_defaults(fn=_cmd_add)
    e = asub.add_parser("export", help="write demonstrations.jsonl and preferences.jsonl from the submissions")
    e.add_argument("--db", required=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--pairs", choices=["all", "best_worst"], default="all")
    e.set_defaults(fn=_cmd_export)
