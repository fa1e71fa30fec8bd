"""Data files and folders as a stream of rows, each with the place it came from.

Input: a path or hub reference and an optional split. Output: ``iter_rows(path, split,
max_line_bytes)`` yields ``(where, row)``: ``where`` is ``FILE:LINE`` (JSONL), ``FILE:row N``
(Parquet, JSON array, ``datasets`` folders; ``FILE[SPLIT]:row N`` for a split), ``row`` whatever
the file holds (``posttrain.core.layouts`` checks it). Every failure is a ``RecordError`` of one line.

What is read:

* JSONL (any suffix but the ones below): streamed a line at a time, at most ``max_line_bytes``
  per line (a longer line is an error naming it, before it is parsed: one 40 MB line used to
  exhaust the tokenizer). UTF-8 only (a BOM is skipped); bytes that are not UTF-8 name the line
  and column. A last line without its newline that is not valid JSON is a write cut short by a
  kill: it is skipped, as ``RecordWriter`` does, with a warning. A file that is one JSON array
  is refused with a hint (name it ``*.json``).
* ``*.json``: one JSON array of objects (or JSON Lines, as ``datasets`` reads them).
* ``*.parquet``: read in batches.
* a folder: ``records.jsonl`` inside it (a stage's output), a ``datasets.save_to_disk`` folder
  (``Dataset`` or ``DatasetDict``), or a folder of data files (a hub snapshot, read with
  ``datasets.load_dataset``).
* ``hf://ORG/NAME`` or ``hf://ORG/NAME:CONFIG``: a hub dataset through ``datasets.load_dataset``
  (its cache), falling back to a snapshot in the local hub cache when the hub cannot be reached.

Splits: a ``DatasetDict`` or hub dataset gives the split named by ``split``; with no split,
``train``, or its only split. A split named for data that has none is an error (it has no effect).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.core.errors import RecordError

log = logging.getLogger("posttrain")

MB = 1024 * 1024
HUB_PREFIX = "hf://"
_BATCH = 512


def is_hub_ref(path: str | Path) -> bool:
    """True for ``hf://ORG/NAME[:CONFIG]`` references."""
    return str(path).startswith(HUB_PREFIX)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---------------------------------------------------------------- JSON Lines

def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                          "re-encode the file as UTF-8") from None


def iter_jsonl(path: Path, max_line_bytes: int = 16 * MB) -> Iterator[tuple[str, Any]]:
    """``(FILE:LINE, value)`` of each non-blank line (see the module docstring); ``*.gz`` is decompressed."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        n = 0
        first = True
        while True:
            raw = f.readline(max_line_bytes + 1)  # never more than the limit in memory
            if not raw:
                return
            n += 1
            complete = raw.endswith(b"\n")
            if len(raw) > max_line_bytes and not complete:
                raise RecordError(f"{path}:{n}: line longer than {max_line_bytes / MB:.3g} MB (the limit is "
                                  "data.max_line_mb); split or shorten the record")
            if first and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            text = _decode(raw, path, n).strip()
            if not text:
                continue
            if first and text.startswith("["):
                raise RecordError(f"{path}:{n}: the file is a JSON array, not one JSON object per line (JSONL): "
                                  "write one record per line, or name the file *.json")
            first = False
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                if not complete and not f.read(1):
                    log.warning("%s:%d: skipped a torn last line (a write cut short)", path, n)
                    return
                msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                hint = "; JSONL needs one whole record per line" if text in ("{", "}") else ""
                raise RecordError(f"{path}:{n}: invalid JSON ({msg}){hint}") from None
            yield f"{path}:{n}", value


def _iter_json_file(path: Path, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
    """A ``*.json`` file: one array of records, or JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        yield from iter_jsonl(path, max_line_bytes)
        return
    text = _decode(path.read_bytes(), path, 1).lstrip("\ufeff")
    try:
        rows = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path)
        raise RecordError(f"{where}: invalid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
    for i, row in enumerate(rows):
        yield f"{path}:row {i}", row


# ---------------------------------------------------------------- columnar

def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=_BATCH)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}:row {i}", row
                i += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError
        raise RecordError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


def _pick_split(dd: Any, split: str | None, label: str) -> tuple[Any, str]:
    names = list(dd)
    if split is None:
        if "train" in names:
            split = "train"
        elif len(names) == 1:
            split = names[0]
        else:
            raise RecordError(f"{label}: has splits {', '.join(names)} and none is 'train': name one with split:")
    if split not in names:
        raise RecordError(f"{label}: no split {split!r} (splits: {', '.join(names) or 'none'})")
    return dd[split], split


def _iter_dataset(ds: Any, label: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(ds):
        yield f"{label}:row {i}", row


def _rows_of(obj: Any, split: str | None, label: str) -> Iterator[tuple[str, Any]]:
    """Rows of a ``Dataset`` or the chosen split of a ``DatasetDict``."""
    import datasets

    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds, name = _pick_split(obj, split, label)
        return _iter_dataset(ds, f"{label}[{name}]")
    if split is not None:
        raise RecordError(f"{label}: split {split!r} has no effect: this dataset has no splits (remove split)")
    return _iter_dataset(obj, label)


def _iter_folder(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        try:
            obj = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - datasets raises many types
            raise RecordError(f"{path}: not a readable datasets folder ({_first_line(e)})") from None
        return _rows_of(obj, split, str(path))
    if not any(p.is_file() for p in path.rglob("*") if not p.name.startswith(".")):
        raise RecordError(f"{path}: an empty folder (expected records.jsonl, a datasets folder or data files)")
    try:  # a folder of data files (e.g. a downloaded hub snapshot): datasets infers the splits
        obj = datasets.load_dataset(str(path))
    except Exception as e:  # noqa: BLE001
        raise RecordError(f"{path}: no records.jsonl, not a datasets folder, and no data files datasets can read "
                          f"({_first_line(e)})") from None
    return _rows_of(obj, split, str(path))


# ---------------------------------------------------------------- hub

def _hub_snapshot(repo: str) -> str | None:
    """The newest snapshot of a dataset repo in the local hub cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, repo_type="dataset", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (the error type varies by version)
        return None


def _iter_hub(ref: str, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    repo, _, config = ref[len(HUB_PREFIX):].partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise RecordError(f"{ref}: expected hf://ORG/NAME or hf://ORG/NAME:CONFIG")

    def load(source: str) -> Any:  # only the named split is downloaded when one is named
        return datasets.load_dataset(source, config or None, **({"split": split} if split else {}))

    try:
        obj = load(repo)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated...: say so in one line
        local = _hub_snapshot(repo)
        if local is None:
            raise RecordError(f"{ref}: cannot load the hub dataset ({_first_line(e)}); without hub access, save it "
                              "elsewhere with datasets' save_to_disk and give that folder") from None
        try:
            obj = load(local)
        except Exception as e2:  # noqa: BLE001
            raise RecordError(f"{ref}: the cached snapshot {local} cannot be read ({_first_line(e2)})") from None
    return _rows_of(obj, None, f"{ref}[{split}]") if split else _rows_of(obj, None, ref)


# ---------------------------------------------------------------- entry

def iter_rows(path: str | Path, split: str | None = None, max_line_bytes: int = 16 * MB) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of every row of a file, folder or hub dataset (see the module docstring)."""
    if is_hub_ref(path):
        yield from _iter_hub(str(path), split)
        return
    p = Path(path)
    if not p.exists():
        raise RecordError(f"{p}: no such file or folder")
    if p.is_dir() and (p / "records.jsonl").exists():
        p = p / "records.jsonl"
    if p.is_dir():
        yield from _iter_folder(p, split)
        return
    if split is not None:
        raise RecordError(f"{p}: split {split!r} has no effect: a single file has no splits (remove split)")
    if p.suffix == ".parquet":
        yield from _iter_parquet(p)
    elif p.suffix == ".json":
        yield from _iter_json_file(p, max_line_bytes)
    else:
        yield from iter_jsonl(p, max_line_bytes)
