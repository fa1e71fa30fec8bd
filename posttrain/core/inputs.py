"""A stage's data input: one file/folder, or a mixture of several sources.

Input: the value of a stage's ``input`` key: a path (JSONL, Parquet, a ``datasets`` folder, or an
``@stage`` reference), or a list of ``Source`` sections (path, weight or row count, optional filter,
split). Output: ``read_input`` -> the normalised records of the requested kind plus stats
(rows read per source, realised mixture counts), deterministic under the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.core.config import key
from posttrain.core.records import iter_records


@dataclass
class Source:
    """One source of a mixture (``input: [{path: ..., weight: ...}, ...]``)."""

    path: str = key(doc="records file or folder, or @stage reference", input=True)
    weight: float | None = key(None, "share of the mixture (weights are normalised over the sources)")
    rows: int | None = key(None, "take this many rows of this source (instead of a weight)")
    where: dict[str, Any] = key(factory=dict, doc="keep rows whose `source` / `meta.KEY` equal these values")
    split: str = key("train", "split of a DatasetDict folder")

    def check(self) -> None:
        """A source is weighted or counted, not both."""
        if self.weight is not None and self.rows is not None:
            raise ValueError("give a source either weight or rows, not both")
        if self.weight is not None and self.weight <= 0:
            raise ValueError("weight must be > 0")
        if self.rows is not None and self.rows < 0:
            raise ValueError("rows must be >= 0")


InputSpec = str | list[Source]


def input_label(spec: InputSpec) -> str:
    """How messages name an input: its path, or the paths of a mixture."""
    return spec if isinstance(spec, str) else "mixture[" + ", ".join(s.path for s in spec) + "]"


def read_input(spec: InputSpec, kind: str | None, resolve: Callable[[str], str], seed: int = 0,
               limit: int | None = None) -> tuple[list[dict], dict]:
    """Records of ``spec`` (validated and normalised to ``kind``), and stats of what was read."""
    if isinstance(spec, str):
        path = resolve(spec)
        recs = []
        for r in iter_records(path, kind):
            recs.append(r)
            if limit is not None and len(recs) >= limit:
                break
        return recs, {"sources": {spec: len(recs)}, "rows": len(recs)}
    raise NotImplementedError("mixtures of several sources are not wired yet")
