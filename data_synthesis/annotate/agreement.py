"""Inter-annotator agreement of rankings.

Input: ``rankings[task_id][annotator] = {response_id: rank}`` (1 = best, equal ranks are ties; the
latest ranking of each annotator). Output: a dict of agreement statistics for ``stats.json``,
each ``None`` where it is not defined (fewer than two annotators on any task, or no variation):

* ``pairwise_agreement``: over every task, pair of annotators and pair of responses that *both*
  annotators ordered strictly, the fraction ordered the same way;
* ``pairwise_agreement_with_ties``: the same over all response pairs, where "a tie" is a third
  answer that must match too;
* ``kendall_tau_b``: the mean over (task, annotator pair) of Kendall's tau-b (scipy; tie-corrected),
  skipping pairs where one ranking is all ties (tau undefined);
* ``krippendorff_alpha_ordinal``: Krippendorff's alpha (package ``krippendorff``), ordinal level,
  with one unit per (task, response) and each ranking turned into mid-ranks, so that rankings that
  order the responses the same way (1,1,3 and 1,1,2) count as identical.
"""

from __future__ import annotations

import math
import warnings
from itertools import combinations


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _mid_ranks(ranks: dict[str, int]) -> dict[str, float]:
    """Ranks rewritten as average positions (1,1,3 and 1,1,2 both become 1.5,1.5,3)."""
    from scipy.stats import rankdata

    ids = list(ranks)
    return dict(zip(ids, (float(v) for v in rankdata([ranks[i] for i in ids], method="average"))))


def _rounded(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def agreement(rankings: dict[str, dict[str, dict[str, int]]]) -> dict:
    """Agreement statistics of several annotators' rankings of the same tasks (see the module docstring)."""
    from scipy.stats import kendalltau

    strict = strict_same = pairs = pairs_same = comparisons = 0
    taus: list[float] = []
    shared = {t: by for t, by in rankings.items() if len(by) >= 2}
    for by in shared.values():
        for a, b in combinations(sorted(by), 2):
            ra, rb = by[a], by[b]
            ids = sorted(set(ra) & set(rb))
            comparisons += 1
            for i, j in combinations(ids, 2):
                sa, sb = _sign(ra[i] - ra[j]), _sign(rb[i] - rb[j])
                pairs += 1
                pairs_same += sa == sb
                if sa and sb:
                    strict += 1
                    strict_same += sa == sb
            with warnings.catch_warnings():  # a constant ranking makes tau undefined (nan): skipped below
                warnings.simplefilter("ignore")
                tau = kendalltau([ra[i] for i in ids], [rb[i] for i in ids]).statistic
            if not math.isnan(tau):
                taus.append(float(tau))
    return {
        "tasks_with_2plus_annotators": len(shared),
        "annotator_pairs_compared": comparisons,
        "response_pairs_both_ordered": strict,
        "pairwise_agreement": _rounded(strict_same / strict) if strict else None,
        "response_pairs_compared": pairs,
        "pairwise_agreement_with_ties": _rounded(pairs_same / pairs) if pairs else None,
        "kendall_tau_b": _rounded(sum(taus) / len(taus)) if taus else None,
        "kendall_tau_b_pairs": len(taus),
        "krippendorff_alpha_ordinal": _rounded(krippendorff_alpha(shared)) if shared else None,
    }


def krippendorff_alpha(rankings: dict[str, dict[str, dict[str, int]]]) -> float | None:
    """Krippendorff's alpha (ordinal) of the rankings, units = (task, response); None where undefined."""
    import krippendorff
    import numpy as np

    coders = sorted({a for by in rankings.values() for a in by})
    units = sorted({(t, r) for t, by in rankings.items() for ranks in by.values() for r in ranks})
    col = {u: k for k, u in enumerate(units)}
    row = {a: k for k, a in enumerate(coders)}
    data = np.full((len(coders), len(units)), np.nan)
    for t, by in rankings.items():
        for a, ranks in by.items():
            for r, v in _mid_ranks(ranks).items():
                data[row[a], col[(t, r)]] = v
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return None  # one value everywhere: no variation, alpha is undefined
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal")
    except ValueError:  # e.g. no unit coded by two annotators
        return None
    return None if math.isnan(value) else float(value)
