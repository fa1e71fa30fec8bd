"""Bootstrap confidence intervals for evaluation verdicts.

Input: per-item verdicts (0/1 or scores) of one checkpoint, or of two checkpoints on the
same items. Output: ``(low, high)`` percentile intervals of the mean (``bootstrap_ci``) and
of the paired mean difference (``paired_diff_ci``).

Paired resampling matters: two checkpoints are evaluated on the *same* held-out items, so
the interval of their difference resamples items once and takes both verdicts of each;
two separate intervals that overlap would hide a difference that the pairing shows.
The resampling generator is seeded, so a report is the same every time it is written.
"""

from __future__ import annotations

from collections.abc import Sequence

N_BOOT = 2000


def _boot_means(values: Sequence[float], n_boot: int, seed: int):
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap of an empty list")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    return v[idx].mean(axis=1)


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    import numpy as np

    means = _boot_means(values, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items and its percentile bootstrap interval: ``(diff, low, high)``."""
    if len(a) != len(b):
        raise ValueError(f"paired verdicts differ in length ({len(a)} vs {len(b)}): not the same items")
    d = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap_ci(d, n_boot, seed, level)
    return sum(d) / len(d), lo, hi


def excludes_zero(lo: float, hi: float) -> bool:
    """Whether an interval lies wholly on one side of zero."""
    return lo > 0 or hi < 0
