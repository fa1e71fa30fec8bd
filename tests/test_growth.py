"""Linear data stages give the same results as the straightforward quadratic loops they replace.

Each fast implementation (selection, semantic tag clustering, path dedupe, resume fingerprint)
is compared with a reference written here the obvious way, on random inputs with fixed seeds
and many ties; then the growth benchmark runs at a small size and must print its exponents.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_synthesis import paths
from data_synthesis.selection import complexity_first_diverse
from data_synthesis.tag_norm import _leaders_exact, _normalise, semantic_aggregate

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- selection

def reference_selection(tags: list[list[str]], budget: int, scores: list[float] | None = None, seed: int = 0,
                        reset_coverage: bool = True) -> list[tuple[int, int]]:
    """Complexity-first diverse sampling as the module docstring says: rescan what is left on every pass."""
    rng = random.Random(seed)
    tie = [rng.random() for _ in tags]
    scores = scores or [0.0] * len(tags)
    sets = [set(t) for t in tags]
    remaining = sorted(range(len(tags)), key=lambda i: (-len(sets[i]), -scores[i], tie[i]))
    chosen: list[tuple[int, int]] = []
    n_pass = 0
    while len(chosen) < budget:
        covered: set[str] = set()
        rest, took = [], False
        for i in remaining:
            if len(chosen) < budget and sets[i] - covered:
                chosen.append((i, n_pass))
                covered |= sets[i]
                took = True
            else:
                rest.append(i)
        remaining = rest
        n_pass += 1  # a pass that takes nothing (only tag-less items left) still counts
        if not took or not reset_coverage:
            break
    return chosen + [(i, n_pass) for i in remaining][: max(0, budget - len(chosen))]


def random_tagged(rng: random.Random, n: int, vocab: int) -> tuple[list[list[str]], list[float] | None]:
    """Tag lists from a small vocabulary (repeats inside a list, empty lists) and coarse scores (ties)."""
    tags = [[f"t{rng.randrange(vocab)}" for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4, 6]))] for _ in range(n)]
    scores = None if rng.random() < 0.3 else [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
    return tags, scores


def test_selection_matches_reference_on_random_inputs():
    rng = random.Random(1)
    for case in range(300):
        n = rng.choice([0, 1, 2, 5, 20, 60, 200])
        tags, scores = random_tagged(rng, n, rng.choice([1, 3, 10, 40]))
        budget = rng.choice([0, 1, 3, max(1, n // 3), n, n + 5])
        seed, reset = rng.randrange(100), rng.random() < 0.7
        got = complexity_first_diverse(tags, budget, scores, seed, reset)
        assert got == reference_selection(tags, budget, scores, seed, reset), (case, n, budget, reset)


def test_selection_scales_linearly():
    """Many passes over 20k instructions: the rescanning version needed seconds per pass here."""
    rng = random.Random(2)
    tags, _ = random_tagged(rng, 20_000, 500)
    import time

    t0 = time.perf_counter()
    got = complexity_first_diverse(tags, 15_000, None, 0)
    assert len(got) == 15_000 and max(p for _, p in got) > 5
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------- semantic clustering

def reference_clusters(counts: dict[str, int], embed, threshold: float) -> dict[str, str]:
    """Leader clustering one tag at a time: compare with every leader, join the most similar (earliest on ties)."""
    tags = sorted(counts, key=lambda t: (-counts[t], len(t), t))
    v = _normalise(embed(tags))
    leaders: list[int] = []
    out = {}
    for i, t in enumerate(tags):
        if leaders:
            sims = v[leaders] @ v[i]
            j = int(np.argmax(sims))  # first maximum: the earliest leader
            if sims[j] >= threshold:
                out[t] = tags[leaders[j]]
                continue
        leaders.append(i)
        out[t] = t
    return out


def clustered_vectors(rng: np.random.Generator, n: int, dim: int = 24) -> dict[str, np.ndarray]:
    """Tags around a few centres at several spreads: merges, near misses and lone tags."""
    centres = rng.normal(size=(max(1, n // 15), dim))
    return {f"tag{i}": centres[rng.integers(len(centres))] + rng.normal(scale=rng.choice([0.05, 0.3, 0.6]), size=dim)
            for i in range(n)}


def dyadic_vectors(rng: np.random.Generator, n: int, dim: int = 16) -> dict[str, np.ndarray]:
    """Unit vectors with 4 entries of +-1/2 (or one 1): every dot product is exact, so ties are real ties."""
    out = {}
    for i in range(n):
        v = np.zeros(dim)
        if rng.random() < 0.2:
            v[rng.integers(dim)] = 1.0
        else:
            v[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        out[f"d{i}"] = v
    return out


@pytest.mark.parametrize("kind", ["clustered", "dyadic"])
def test_semantic_clusters_match_reference(kind):
    rng = np.random.default_rng(3)
    for case in range(12):
        n = int(rng.choice([1, 2, 30, 300, 1500]))
        vec = clustered_vectors(rng, n) if kind == "clustered" else dyadic_vectors(rng, n)
        counts = {t: int(rng.integers(1, 4)) for t in vec}  # many equal counts: order by length, then name
        emb = lambda ts: np.array([vec[t] for t in ts])  # noqa: E731
        for threshold in ([0.8, 0.95] if kind == "clustered" else [0.5, 0.75, 1.0]):
            want = reference_clusters(counts, emb, threshold)
            for block in (1, 7, 512):
                assert semantic_aggregate(counts, emb, threshold, block=block) == want, (kind, case, threshold, block)


def test_semantic_leader_chunks_keep_the_earliest_on_ties():
    """Leaders compared in column chunks: an equal similarity in a later chunk must not win."""
    rng = np.random.default_rng(4)
    vec = dyadic_vectors(rng, 800)
    tags = list(vec)
    v = _normalise(np.array([vec[t] for t in tags]))
    want = _leaders_exact(v, 0.5, block=800, cols=10**6)
    ref = reference_clusters({t: len(tags) - i for i, t in enumerate(tags)}, lambda ts: np.array([vec[t] for t in ts]),
                             0.5)
    assert [tags[j] for j in want] == [ref[t] for t in tags]
    for block, cols in [(1, 1), (5, 3), (64, 17), (256, 1000)]:
        assert np.array_equal(_leaders_exact(v, 0.5, block=block, cols=cols), want), (block, cols)


# ---------------------------------------------------------------- path dedupe

def reference_select_diverse(texts: list[str], m: int, threshold: float) -> list[int]:
    """Dedupe against every kept path, then farthest-point selection recomputing every similarity."""
    if not texts or m <= 0:
        return []
    uniq: list[int] = []
    for i, t in enumerate(texts):
        if not any(paths.similarity(t, texts[j]) >= threshold for j in uniq):
            uniq.append(i)
    chosen, rest = [uniq[0]], uniq[1:]
    worst = {i: paths.similarity(texts[i], texts[chosen[0]]) for i in rest}
    while rest and len(chosen) < m:
        best = min(rest, key=lambda i: (worst[i], i))
        chosen.append(best)
        rest.remove(best)
        for i in rest:
            worst[i] = max(worst[i], paths.similarity(texts[i], texts[best]))
    return chosen


WORDS = "so then we add take the answer is total apples each more left".split()


def random_paths(rng: random.Random, n: int) -> list[str]:
    """Short paths from a tiny vocabulary: copies, re-spaced copies, one-word edits, empties, equations."""
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if out and r < 0.15:
            out.append(rng.choice(out))
        elif out and r < 0.35:
            w = rng.choice(out).split() or ["so"]
            w[rng.randrange(len(w))] = rng.choice(WORDS)
            out.append(" ".join(w))
        elif r < 0.4:
            out.append(rng.choice(["", " ", "so"]))
        else:
            parts = []
            for _ in range(rng.randint(1, 6)):
                if rng.random() < 0.4:
                    a, b = rng.randint(1, 4), rng.randint(1, 4)
                    parts.append(f"{a} {rng.choice('+*')} {b} = {a + b}")
                else:
                    parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))))
            text = ", ".join(parts)
            out.append(text.replace(" = ", "=") if rng.random() < 0.2 else text)
    return out


def test_select_diverse_matches_reference_on_random_paths():
    rng = random.Random(5)
    for case in range(150):
        texts = random_paths(rng, rng.choice([1, 2, 8, 30, 80]))
        threshold = rng.choice([0.0, 0.3, 0.6, 2 / 3, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1])
        m = rng.choice([0, 1, 2, 4, 10, 100])
        assert paths.select_diverse(texts, m, threshold) == reference_select_diverse(texts, m, threshold), \
            (case, threshold, m)


def test_ratio_bound_never_rejects_a_similar_pair():
    """``_may_reach`` is an exact bound: whenever difflib's ratio reaches t, it says so."""
    rng = random.Random(6)
    texts = random_paths(rng, 400)
    ps = [paths._Path(t) for t in texts]
    for _ in range(20000):
        p, q = rng.choice(ps), rng.choice(ps)
        r = difflib.SequenceMatcher(None, p.toks, q.toks, autojunk=False).ratio()
        for t in (0.5, 0.7, 0.9, r):
            if r >= t:
                assert paths._may_reach(p, q, t)


def edited_pool(rng: random.Random, n_base: int, vocab: int) -> list[str]:
    """Base word sequences and copies with a few random edits: many pairs close to any threshold."""
    words = [f"w{i}" for i in range(vocab)]
    out = []
    for _ in range(n_base):
        base = [rng.choice(words) for _ in range(rng.randint(1, 40))]
        out.append(" ".join(base))
        for _ in range(4):
            s = list(base)
            for _ in range(rng.randint(0, 6)):
                k = rng.randrange(len(s) + 1)
                op = rng.random()
                if op < 0.33 or not s:
                    s.insert(k, rng.choice(words))
                elif op < 0.66:
                    del s[min(k, len(s) - 1)]
                else:
                    s[min(k, len(s) - 1)] = rng.choice(words)
            out.append(" ".join(s))
    return out


def test_prefix_filter_finds_every_similar_pair():
    """For every pair at or above the threshold, the index lookups of ``_unique`` meet (the filter is exact)."""
    rng = random.Random(8)
    ps = [paths._Path(t) for t in edited_pool(rng, 20, 5) + edited_pool(rng, 20, 30)]
    ratios = {}
    for a, p in enumerate(ps):
        for b, q in enumerate(ps):
            la, lb = len(p.toks), len(q.toks)
            if a != b and la and lb and 2 * min(la, lb) / (la + lb) >= 0.5:
                ratios[a, b] = difflib.SequenceMatcher(None, p.toks, q.toks, autojunk=False).ratio()
    ranks = paths._ranks(ps)
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
        pre = [paths._prefixes(p, ranks, threshold) for p in ps]
        similar = [(a, b) for (a, b), r in ratios.items() if r >= threshold]
        assert len(similar) > 50
        for a, b in similar:
            tok_a, bi_a, _ = pre[a]
            tok_b, bi_b, long_b = pre[b]
            # b kept, a looking: b is filed under its bigram prefix when it has one, else its token prefix
            assert set(bi_a) & set(bi_b) if long_b else set(tok_a) & set(tok_b), (threshold, a, b)


def test_signature_is_computed_once_per_path(monkeypatch):
    calls = []
    real = paths.equation_signature
    monkeypatch.setattr(paths, "equation_signature", lambda t: calls.append(t) or real(t))
    texts = random_paths(random.Random(7), 200)
    paths.select_diverse(texts, 4, 0.9)
    assert len(calls) == len(texts)


# ---------------------------------------------------------------- resume fingerprint

def test_fingerprint_is_one_hash_chain(tmp_path):
    """Each stage's fingerprint hashes the previous one and its own config; computed once for the recipe."""
    from posttrain.stages import recipe_from_dict

    src = tmp_path / "tagged.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": [{"role": "user", "content": "Write a poem."}],
                               "meta": {"tags": ["poem writing"]}}) + "\n")
    data = {"output_dir": str(tmp_path / "out"),
            "stages": [{"kind": "select", "name": f"s{i}", "input": str(src), "budget": 1 + i} for i in range(5)]}
    recipe = recipe_from_dict(data, tmp_path / "r.yaml")
    d = recipe.resolved_dict()
    d.pop("description", None)
    stages = d.pop("stages")
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
    want = []
    for st in stages:
        h = hashlib.sha256((h + json.dumps(st, sort_keys=True, default=str)).encode()).hexdigest()
        want.append(h[:16])
    assert [recipe.fingerprint(i) for i in range(5)] == want
    calls = []
    real = recipe.resolved_dict
    recipe._fingerprints = None
    recipe.resolved_dict = lambda: calls.append(1) or real()
    [recipe.fingerprint(i) for i in range(5)]
    assert len(calls) == 1


# ---------------------------------------------------------------- the benchmark script

def test_bench_growth_prints_exponents():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_growth.py"), "--sizes", "100,400"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert text.startswith("## Growth (data stages)")
    for row in ("select", "instag normalisation", "rejection-sampling dedupe", "resume fingerprint"):
        line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
        assert re.search(r"\| -?\d+\.\d\d \|$", line), line  # ends with an exponent
    assert "exponent 1e2→400" in text and "400 instructions through instag normalisation + selection" in text
