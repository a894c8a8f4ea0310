"""Spread across seeds and the confidence interval of a difference, from ``scipy.stats``.

A comparison of attention modules is a comparison of means over seeds. Runs that share a
seed share their data order and initial weights (up to the module), so where both groups
ran the same seeds the difference is taken per seed (paired t); otherwise the groups are
independent samples of unequal spread (Welch's t).
"""
import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from scipy import stats

PAIRED = "paired"
WELCH = "welch"


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); no spread from a single run."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` and, with enough runs, its confidence interval and p-value."""
    estimate: float
    low: Optional[float]
    high: Optional[float]
    p_value: Optional[float]
    method: Optional[str]  # "paired" | "welch" | None (too few runs for an interval)


def difference(a: Sequence[float], b: Sequence[float], seeds_a: Sequence[int], seeds_b: Sequence[int],
               confidence: float = 0.95) -> Difference:
    """Difference of means of ``a`` and ``b`` with a ``confidence`` interval.

    Paired by seed when both sides ran the same distinct seeds (at least two), Welch's t
    when both have two or more runs otherwise, no interval below that.
    """
    if len(a) != len(seeds_a) or len(b) != len(seeds_b):
        raise ValueError("difference needs one seed per value")
    estimate = statistics.fmean(a) - statistics.fmean(b)
    paired = len(a) > 1 and len(set(seeds_a)) == len(seeds_a) and sorted(seeds_a) == sorted(seeds_b)
    if paired:
        by_seed = dict(zip(seeds_b, b))
        result = _quiet(stats.ttest_rel, list(a), [by_seed[s] for s in seeds_a])
    elif len(a) > 1 and len(b) > 1:
        result = _quiet(stats.ttest_ind, list(a), list(b), equal_var=False)
    else:
        return Difference(estimate, None, None, None, None)
    interval = result.confidence_interval(confidence)
    p_value = float(result.pvalue)
    return Difference(estimate, float(interval.low), float(interval.high),
                      None if math.isnan(p_value) else p_value, PAIRED if paired else WELCH)


def _quiet(test, *args, **kwargs):
    """Run a scipy test without its warning for identical values (the interval is then a point)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return test(*args, **kwargs)
