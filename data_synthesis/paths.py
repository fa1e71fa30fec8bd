"""Reasoning paths of one problem: de-duplication, diversity and pass@k (rejection sampling).

Input: the texts of a problem's sampled paths (and counts of correct ones). Output: the
normalised equation sequence of a path (``equation_signature``), a path similarity
(``similarity``), up to m diverse paths (``select_diverse``: near-duplicates dropped, the most
different ones preferred) and the unbiased pass@k estimate (``pass_at_k``).
"""

from __future__ import annotations

import difflib
import math
import re
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


def similarity(a: str, b: str) -> float:
    """Similarity of two paths in [0, 1]: 1.0 for the same equation sequence, else token-sequence ratio."""
    ea, eb = equation_signature(a), equation_signature(b)
    if ea and ea == eb:
        return 1.0
    return difflib.SequenceMatcher(None, _tokens(a), _tokens(b), autojunk=False).ratio()


def select_diverse(texts: Sequence[str], m: int, threshold: float = 0.9) -> list[int]:
    """Indices of up to ``m`` texts, dropping near-duplicates and preferring the most different.

    Duplicates: same equation sequence or similarity >= ``threshold`` to an earlier text.
    Among the rest, greedy farthest-point selection: start from the first, then repeatedly
    take the text whose highest similarity to the chosen ones is lowest (ties: earliest).
    """
    uniq: list[int] = []
    for i, t in enumerate(texts):
        if all(similarity(t, texts[j]) < threshold for j in uniq):
            uniq.append(i)
    if not uniq or m <= 0:
        return []
    chosen = [uniq[0]]
    rest = uniq[1:]
    while rest and len(chosen) < m:
        scores = [(max(similarity(texts[i], texts[j]) for j in chosen), i) for i in rest]
        _, best = min(scores)
        chosen.append(best)
        rest.remove(best)
    return chosen


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples with c correct (Chen et al. 2021)."""
    if n <= 0 or k <= 0:
        return 0.0
    k = min(k, n)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


