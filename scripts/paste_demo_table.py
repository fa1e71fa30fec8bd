"""Paste a finished demo run's results into README.md, between its markers, so the README is the run.

Input: a run folder (default ``runs/demo``) with ``eval/eval.jsonl``, every stage's ``manifest.json``
(its ``seconds`` and provenance) and ``report/report.md``. Output: README.md's block between
``<!-- demo-table:<name>:start -->`` and ``<!-- demo-table:<name>:end -->`` replaced by the results
table (with bootstrap 95% intervals), the report's findings, the wall time per stage and in all, the
machine (CPU model, cores) and the commit.

    .venv/bin/python scripts/paste_demo_table.py runs/demo --name smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import cpu_model  # noqa: E402  (the one machine line of every benchmark table)
from posttrain.evaluation.evaluate import format_table  # noqa: E402


def block(run: Path) -> str:
    """The Markdown pasted into the README for ``run``."""
    rows = [json.loads(x) for x in (run / "eval" / "eval.jsonl").read_text().splitlines() if x.strip()]
    for r in rows:
        r.pop("verdicts", None)
    manifests = []
    for m in sorted(run.glob("*/manifest.json")):
        manifests.append(json.loads(m.read_text()))
    order = {n: i for i, n in enumerate(json.loads((run / "timings.json").read_text()))} \
        if (run / "timings.json").exists() else {}
    manifests.sort(key=lambda m: order.get(m["name"], len(order)))
    total = sum(m.get("seconds", 0.0) for m in manifests)
    prov = manifests[0].get("provenance", {}) if manifests else {}
    commit = str(prov.get("git_commit") or prov.get("commit") or "?")[:7]
    finished = max((m.get("finished", "") for m in manifests), default="?")
    report = (run / "report.md").read_text() if (run / "report.md").exists() else ""
    found = re.search(r"## Findings\n\n(.*?)\n\n", report, re.S)
    times = ", ".join(f"{m['name']} {m.get('seconds', 0) / 60:.1f}" for m in manifests)
    return "\n".join([
        format_table(rows), "",
        "Findings (computed by the report stage, paired bootstrap 95% intervals over the same held-out items):", "",
        found.group(1) if found else "_none_", "",
        f"Run finished {finished[:10]} at commit {commit}, {os.cpu_count()} cores ({cpu_model()}); "
        f"wall time of the stages {total / 60:.1f} min (set-up excluded); per stage, minutes: {times}.",
    ])


def paste(readme: Path, name: str, text: str) -> None:
    """Replace the named marker block of ``readme`` with ``text``; an error if the markers are missing."""
    start, end = f"<!-- demo-table:{name}:start -->", f"<!-- demo-table:{name}:end -->"
    src = readme.read_text(encoding="utf-8")
    if start not in src or end not in src:
        raise SystemExit(f"{readme}: markers {start} ... {end} not found")
    head, rest = src.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")


def main() -> int:
    """Paste the run's block into README.md (or print it with --print)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", default=ROOT / "runs" / "demo")
    ap.add_argument("--name", default="smollm2", help="marker name in README.md")
    ap.add_argument("--print", action="store_true", help="print the block instead of pasting it")
    a = ap.parse_args()
    text = block(a.run)
    if a.print:
        print(text)
    else:
        paste(ROOT / "README.md", a.name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
