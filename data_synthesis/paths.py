"""Reasoning paths of one problem: de-duplication, diversity and pass@k (rejection sampling).

Input: the texts of a problem's sampled paths (and counts of correct ones). Output: the
normalised equation sequence of a path (``equation_signature``), a path similarity
(``similarity``), up to m diverse paths (``select_diverse``: near-duplicates dropped, the most
different ones preferred) and the unbiased pass@k estimate (``pass_at_k``).

``select_diverse`` gives the same result as comparing every pair, with far fewer comparisons:
each path's signature, tokens, token multiset and bigram multiset are computed once; exact
duplicates are found by hashing the signature; near-duplicates (token-sequence ratio >=
threshold) only among the kept paths that share a rare token with the path in the prefixes of
their token multisets (prefix filtering), and difflib runs only on the candidates whose exact
upper bound on the ratio (lengths, shared tokens, shared bigrams) reaches the threshold. The
farthest-point phase is lazy: after the first pick, a path is compared with a newly chosen one
only while it could still be the least similar. Over the stage this is linear in the number of
problems; within one problem of k paths, near-linear when paths have rare words, at worst k^2
cheap set intersections (paths written from a few templates).
"""

from __future__ import annotations

import difflib
import heapq
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


def _multiset(items: Sequence) -> frozenset:
    """A multiset as a set of ``(item, occurrence)`` pairs: set intersection is multiset intersection."""
    seen: Counter = Counter()
    out = []
    for t in items:
        out.append((t, seen[t]))
        seen[t] += 1
    return frozenset(out)


class _Path:
    """A path's signature, tokens, token multiset and bigram multiset, computed once."""

    __slots__ = ("sig", "toks", "uni", "bi")

    def __init__(self, text: str):
        self.sig = equation_signature(text)
        self.toks = _tokens(text)
        self.uni = _multiset(self.toks)
        self.bi = _multiset(list(zip(self.toks, self.toks[1:])))


def _sim(p: _Path, q: _Path) -> float:
    if p.sig and p.sig == q.sig:
        return 1.0
    return _ratio(p.toks, q.toks)


def _may_reach(p: _Path, q: _Path, t: float) -> bool:
    """False when ``_ratio(p.toks, q.toks)`` is certainly below ``t`` (an exact bound, not an estimate).

    difflib's ratio is 2M / (la + lb), M the tokens in its matching blocks. M is at most the
    shorter length and the shared tokens (multiset); and since a block of length n holds n - 1
    bigrams found in both paths and there are at most (la - M) + (lb - M) + 1 blocks (two
    consecutive blocks are separated by an unmatched token in one path or the other),
    M <= shared bigrams + la + lb - 2M + 1, so M <= (shared bigrams + la + lb + 1) // 3.
    """
    la, lb = len(p.toks), len(q.toks)
    total = la + lb
    if total == 0:
        return True  # two empty paths: ratio 1.0
    m = min(la, lb)
    if 2.0 * m / total < t:  # the same float expression difflib uses, so the bound is never rounded off
        return False
    m = min(m, len(p.uni & q.uni))
    if 2.0 * m / total < t:
        return False
    m = min(m, (len(p.bi & q.bi) + total + 1) // 3)
    return 2.0 * m / total >= t


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
    if m == 1:
        return chosen
    # Lazy greedy: each heap entry is (highest similarity to chosen[:done], index), a lower bound
    # of its key; an entry popped while up to date has the smallest (key, index) of all, exactly.
    heap = [(_sim(ps[i], ps[chosen[0]]), i) for i in uniq[1:]]
    heapq.heapify(heap)
    done = dict.fromkeys(uniq[1:], 1)  # how many of the chosen each entry has been compared with
    while heap and len(chosen) < m:
        w, i = heapq.heappop(heap)
        if done[i] < len(chosen):
            for c in chosen[done[i]:]:
                if w < 1.0:  # a similarity never exceeds 1
                    w = max(w, _sim(ps[i], ps[c]))
            done[i] = len(chosen)
            heapq.heappush(heap, (w, i))
        else:
            chosen.append(i)
    return chosen


def _prefix_sizes(n: int, t: float) -> tuple[int, int]:
    """How many of a path's rarest tokens and bigrams (of ``n`` tokens) a similar pair must share one of.

    Tokens: the ratio is at most the multiset overlap 2o/(la+lb), so a pair at or above ``t`` has
    lengths within t/(2-t) of each other and o >= t*la/(2-t) shared tokens. Bigrams (``_may_reach``):
    o2 >= 3M - (la+lb) - 1 >= (1.5t - 1)(la+lb) - 1 >= (1.5t - 1) * 2la/(2-t) - 1, which is of use
    only above t = 2/3. Returns (token prefix, bigram prefix); bigram prefix 0: no guarantee, the
    path is filed under its tokens. Small tolerances keep float rounding on the safe side (longer).
    """
    tok = n - math.ceil(t * n / (2 - t) - 1e-9) + 1
    need2 = math.ceil((1.5 * t - 1) * 2 * n / (2 - t) - 1 - 1e-6)
    return tok, (n - need2 if need2 >= 1 else 0)


def _ranks(ps: list[_Path]) -> tuple[dict, dict]:
    """The global order of token and of bigram elements: rare first, ties by the element (deterministic)."""
    freq: Counter = Counter(e for p in ps for e in p.uni)
    freq2: Counter = Counter(e for p in ps for e in p.bi)
    return {e: (c, e) for e, c in freq.items()}, {e: (c, e) for e, c in freq2.items()}


def _prefixes(p: _Path, ranks: tuple[dict, dict], t: float) -> tuple[list, list, bool]:
    """A path's token prefix, its bigram prefix (all its bigrams when it has no bigram bound), and
    whether it has a bigram bound (then it is filed under the bigram prefix when kept)."""
    n = len(p.toks)
    n_tok, n_bi = _prefix_sizes(n, t) if n and t > 0 else (0, 0)
    prefix = sorted(p.uni, key=ranks[0].__getitem__)[:n_tok]
    prefix2 = sorted(p.bi, key=ranks[1].__getitem__)[:n_bi] if n_bi else list(p.bi)
    return prefix, prefix2, n_bi > 0


def _unique(ps: list[_Path], threshold: float) -> list[int]:
    """Indices of paths with no earlier kept path of the same signature or ratio >= ``threshold``.

    Candidates by prefix filtering: with the elements of every multiset in one global order
    (rarest first), two multisets with at least o_a (resp. o_b) shared elements whatever the
    partner share one among the first |a| - o_a + 1 elements of a and the first |b| - o_b + 1 of
    b. A kept path is filed under its bigram prefix when ``_prefix_sizes`` gives one (bigrams are
    rarer than tokens: fewer candidates), else under its token prefix; a new path looks in both
    (in the bigram index with all its bigrams when it has no bigram bound of its own: a long kept
    partner guarantees the shared bigrams). Candidates reach difflib only through ``_may_reach``.
    """
    t = threshold
    if t > 1:  # no similarity reaches it: nothing is a duplicate
        return list(range(len(ps)))
    ranks = _ranks(ps)
    index: dict[tuple, list[int]] = defaultdict(list)  # token prefix element -> kept paths without a bigram bound
    index2: dict[tuple, list[int]] = defaultdict(list)  # bigram prefix element -> kept paths with one
    by_sig: set[tuple[str, ...]] = set()
    kept: list[int] = []
    has_empty = False  # a kept path without tokens
    for i, p in enumerate(ps):
        if p.sig and p.sig in by_sig:
            continue
        n = len(p.toks)
        prefix, prefix2, long = _prefixes(p, ranks, t)
        dup = False
        if t <= 0:
            dup = bool(kept)
        elif not n:  # an empty path matches an earlier empty one (ratio 1.0), nothing else
            dup = has_empty
        else:
            cands: set[int] = set()
            for e in prefix:
                cands.update(index.get(e, ()))
            for e in prefix2:
                cands.update(index2.get(e, ()))
            dup = any(_may_reach(p, ps[j], t) and _ratio(p.toks, ps[j].toks) >= t for j in cands)
        if dup:
            continue
        kept.append(i)
        has_empty = has_empty or not n
        if p.sig:
            by_sig.add(p.sig)
        if long:
            for e in prefix2:
                index2[e].append(i)
        else:
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
