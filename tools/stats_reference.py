"""Reference values for src/experiments/stats.rs's tests (scipy). Run: python tools/stats_reference.py"""
import numpy as np
import scipy
from scipy import special, stats

print("scipy", scipy.__version__)
for a, b, x in [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (2.5, 0.5, 0.1), (10.0, 3.0, 0.7), (50.0, 0.5, 0.95), (1.0, 1.0, 0.25)]:
    print("betainc", a, b, x, repr(special.betainc(a, b, x)))
for t, df in [(2.0, 4.0), (-1.5, 9.0), (0.3, 1.0), (4.0, 14.0), (-3.2, 29.0)]:
    print("t.cdf", t, df, repr(stats.t.cdf(t, df)))
for df in [1.0, 2.0, 4.0, 9.0, 14.0, 49.0]:
    print("t.ppf 0.975", df, repr(stats.t.ppf(0.975, df)))
a = np.array([71.2, 68.4, 75.0, 80.1, 66.3, 72.9])
b = np.array([69.8, 68.9, 72.4, 78.0, 65.1, 70.2])
r = stats.ttest_rel(a, b)
d = a - b
print("ttest_rel mean", repr(d.mean()), "t", repr(r.statistic), "p", repr(r.pvalue))
print("diff ci half", repr(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))))
v = np.array([55.0, 58.5, 61.0, 54.5, 57.0])
print("ci half", repr(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))))
x = np.array([0.1, 0.4, 0.35, 0.8, 0.62, 0.05, 0.9, 0.33, 0.71, 0.2])
y = np.array([0.02, 0.11, 0.2, 0.3, 0.09, 0.05, 0.41, 0.12, 0.1, 0.15])
s = stats.spearmanr(x, y)
print("spearmanr n=10", repr(s.statistic), repr(s.pvalue))


def exact(x, y):
    res = stats.permutation_test((x, y), lambda x, y: stats.spearmanr(x, y).statistic,
                                 permutation_type="pairings", alternative="two-sided", n_resamples=np.inf)
    return stats.spearmanr(x, y).statistic, res.pvalue


print("spearman exact n=6", *map(repr, exact(x[:6], y[:6])))
print("spearman exact ties", *map(repr, exact(np.array([1.0, 2.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 2.0, 5.0]))))
print("spearman exact n=3", *map(repr, exact(np.array([1.0, 2.0, 3.0]), np.array([1.0, 5.0, 9.0]))))
