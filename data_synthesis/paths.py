"""Reasoning paths of one problem: de-duplication, diversity and pass@k (rejection sampling).

Input: the texts of a problem's sampled paths (and counts of correct ones). Output: the
normalised equation sequence of a path (``equation_signature``), a path similarity
(``similarity``), up to m diverse paths (``select_diverse``: near-duplicates dropped, the most
different ones preferred) and the unbiased pass@k estimate (``pass_at_k``).

``select_diverse`` is near-linear in the number of paths: each path's signature and tokens are
computed once; exact duplicates are found by hashing the signature; near-duplicates
(token-sequence ratio >= threshold) only among candidate pairs that pass an exact filter (a
length bound and a shared rare token in a prefix of each token multiset, which every pair with
ratio >= threshold must have); the farthest-point phase costs O(n m) ratios for m kept paths.
The result is the same as comparing every pair.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence


_EQ = re.compile(r"[\d.,()\s+\-*/×÷x^]*\d[\d.,()\s+\-*/×÷x^]*=\s*-?[\d.,]+")


def equation_signature(text: str) -> tuple[str, ...]:
    """The normalised sequence of equations in a path (``3 × 4 = 12`` -> ``3*4=12``)."""
    eqs = []
    for m in _EQ.finditer(text):
        e = m.group(0).replace("×", "*").replace("÷", "/").replace("x", "*")
        e = re.sub(r"\s+", "", e).strip(",.")
        e = e.replace(",", "")
        if re.search(r"[+\-*/^]", e.split("=")[0]):  # only real computations, not "x = 5"
            eqs.append(e)
    return tuple(eqs)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _ratio(a: list[str], b: list[str]) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def similarity(a: str, b: str) -> float:
    """Similarity of two paths in [0, 1]: 1.0 for the same equation sequence, else token-sequence ratio."""
    ea, eb = equation_signature(a), equation_signature(b)
    if ea and ea == eb:
        return 1.0
    return _ratio(_tokens(a), _tokens(b))


class _Path:
    """A path's signature, tokens and token multiset (as ``(token, occurrence)`` elements), computed once."""

    __slots__ = ("sig", "toks", "elems")

    def __init__(self, text: str):
        self.sig = equation_signature(text)
        self.toks = _tokens(text)
        seen: Counter = Counter()
        elems = []
        for t in self.toks:
            elems.append((t, seen[t]))
            seen[t] += 1
        self.elems = elems


def _sim(p: _Path, q: _Path) -> float:
    if p.sig and p.sig == q.sig:
        return 1.0
    return _ratio(p.toks, q.toks)


def select_diverse(texts: Sequence[str], m: int, threshold: float = 0.9) -> list[int]:
    """Indices of up to ``m`` texts, dropping near-duplicates and preferring the most different.

    Duplicates: same equation sequence or similarity >= ``threshold`` to an earlier kept text.
    Among the rest, greedy farthest-point selection: start from the first, then repeatedly
    take the text whose highest similarity to the chosen ones is lowest (ties: earliest).
    """
    if not texts or m <= 0:
        return []
    ps = [_Path(t) for t in texts]
    uniq = _unique(ps, threshold)
    chosen = [uniq[0]]
    rest = uniq[1:]
    worst = {i: _sim(ps[i], ps[chosen[0]]) for i in rest}  # highest similarity to the chosen ones
    while rest and len(chosen) < m:
        best = min(rest, key=lambda i: (worst[i], i))
        chosen.append(best)
        rest.remove(best)
        for i in rest:
            if worst[i] < 1.0:
                worst[i] = max(worst[i], _sim(ps[i], ps[best]))
    return chosen


def _unique(ps: list[_Path], threshold: float) -> list[int]:
    """Indices of paths with no earlier kept path of the same signature or ratio >= ``threshold``.

    Exact filter for the ratio: difflib's ratio 2M/(|a|+|b|) is at most the multiset overlap
    2|a & b|/(|a|+|b|), so a pair at or above the threshold has overlap
    o >= t(|a|+|b|)/2 and lengths within t/(2-t) of each other; with the elements of every
    multiset in one global order (rarest first), such a pair shares an element among the first
    |a| - ceil(t|a|/(2-t)) + 1 elements of a, and likewise of b (prefix filtering).
    """
    t = threshold
    if t > 1:  # no similarity reaches it: nothing is a duplicate
        return list(range(len(ps)))
    freq: Counter = Counter(e for p in ps for e in set(p.elems))
    rank = {e: (c, e) for e, c in freq.items()}  # rare first; ties by the element itself (deterministic)
    index: dict[tuple, list[int]] = defaultdict(list)  # prefix element -> kept paths
    by_sig: set[tuple[str, ...]] = set()
    kept: list[int] = []
    for i, p in enumerate(ps):
        if p.sig and p.sig in by_sig:
            continue
        n = len(p.elems)
        order = sorted(p.elems, key=rank.__getitem__)
        prefix = order[: n - math.ceil(t * n / (2 - t) - 1e-9) + 1] if n else []
        dup = False
        if t <= 0:
            dup = bool(kept)
        else:
            seen: set[int] = set()
            for e in prefix:
                for j in index.get(e, ()):
                    if j in seen:
                        continue
                    seen.add(j)
                    q = ps[j]
                    la, lb = n, len(q.elems)
                    if la + lb == 0 or 2 * min(la, lb) / (la + lb) < t:
                        continue  # real_quick_ratio bound
                    if _ratio(p.toks, q.toks) >= t:
                        dup = True
                        break
                if dup:
                    break
            if not n and not dup:  # an empty path matches an earlier empty one (ratio 1.0)
                dup = any(not ps[j].elems for j in kept)
        if dup:
            continue
        kept.append(i)
        if p.sig:
            by_sig.add(p.sig)
        for e in prefix:
            index[e].append(i)
    return kept


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples with c correct (Chen et al. 2021)."""
    if n <= 0 or k <= 0:
        return 0.0
    k = min(k, n)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
