"""Export of an annotations database to demonstrations and preferences (stage ``annotation_export``).

Input: the SQLite file of ``posttrain annotate serve`` (tasks and every submission with its
author). Output, in the stage's folder (or ``--out``), from the latest submission of each
(task, annotator):

* ``demonstrations.jsonl``: prompt + the top-ranked response (the edited text when edited);
  ``meta`` names the task, annotator, response, its generator label and whether it was edited;
* ``preferences.jsonl``: ranked pairs with the original texts, ``pairs: all`` = every pair with
  different ranks, ``best_worst`` = the best response against each response of the worst rank;
  ``margin`` = rank difference;
* ``stats.json``: counts, submissions per annotator and inter-annotator agreement
  (``data_synthesis.annotate.agreement``).

Records are TRL's conversational formats (``posttrain.core.records.demonstration`` / ``preference``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data_synthesis.annotate.agreement import agreement
from data_synthesis.annotate.store import connect
from posttrain.core.config import key
from posttrain.core.errors import BadInput
from posttrain.core.records import demonstration, preference, record_id, write_records


@dataclass
class AnnotationExportConfig:
    """Keys of stage ``annotation_export`` (annotations database -> demonstrations and preferences)."""

    db: str = key(doc="the SQLite database written by `posttrain annotate serve`", input=True)
    pairs: Literal["all", "best_worst"] = key("all", "preference pairs: every ranked pair, or best vs worst")


def ranking_pairs(order: list[str], ranks: dict[str, int], mode: str, best_id: str) -> list[tuple[str, str]]:
    """(better, worse) response-id pairs of one ranking; ties give no pair.

    ``all``: every pair with different ranks (in ``order``); ``best_worst``: ``best_id``
    against each response of the worst rank.
    """
    if mode == "best_worst":
        worst = max(ranks.values())
        return [(best_id, i) for i in order if ranks[i] == worst and ranks[i] > ranks[best_id]]
    return [(a, b) for a in order for b in order if ranks[a] < ranks[b]]


def _read(db: str | os.PathLike) -> tuple[dict[str, dict], list[tuple], int]:
    if not Path(db).is_file():
        raise FileNotFoundError(f"{db}: no such annotations database")
    try:
        conn = connect(db, init=False)
        try:
            tasks = {i: json.loads(d) for i, d in conn.execute("SELECT id, data FROM tasks")}
            subs = conn.execute(
                "SELECT s.task_id, s.annotator, s.created, s.ranking, s.best_id, s.edited, s.id FROM submissions s "
                "WHERE s.id = (SELECT MAX(id) FROM submissions x "
                "WHERE x.task_id = s.task_id AND x.annotator = s.annotator) ORDER BY s.id").fetchall()
            n_all = conn.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:  # not SQLite, or not written by `annotate serve`
        raise BadInput(f"{db}: not an annotations database ({e})") from None
    return tasks, subs, n_all


def export(db: str | os.PathLike, out_dir: str | os.PathLike, pairs: str = "all") -> dict:
    """Write demonstrations.jsonl, preferences.jsonl and stats.json from the latest submission of each
    (task, annotator); return the stats."""
    tasks, subs, n_all = _read(db)
    demos, prefs = [], []
    rankings: dict[str, dict[str, dict[str, int]]] = {}
    per_annotator: dict[str, int] = {}
    for task_id, annotator, created, ranking, best_id, edited, sub_id in subs:
        task = tasks[task_id]
        ranks = json.loads(ranking)
        rankings.setdefault(task_id, {})[annotator] = ranks
        per_annotator[annotator] = per_annotator.get(annotator, 0) + 1
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
             "tasks_annotated": len(rankings), "annotators": len(per_annotator),
             "per_annotator": dict(sorted(per_annotator.items())),
             "demonstrations": len(demos), "edited": sum(d["meta"]["edited"] for d in demos),
             "preferences": len(prefs), "pairs": pairs, "agreement": agreement(rankings)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return stats


def run_export_stage(cfg: AnnotationExportConfig, ctx) -> dict:
    """Entry point of stage kind ``annotation_export``."""
    return export(ctx.resolve(cfg.db), ctx.out_dir, cfg.pairs)
