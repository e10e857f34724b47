"""Paired comparison of each method with vanilla OPD: per seed, the difference in mean held-out accuracy over a window
of evaluations, and the mean difference with a 95% t-interval over seeds.

Seed s gives every method the same data order and the same evaluation random numbers, so the difference is paired by
seed. The windows: `early` (the evaluations after step 0 up to `early_end`: the pre-registered test of docs/demo.md),
`curve` (every evaluation, step 0 included) and `final` (the last evaluation).
"""

import math
from statistics import mean, stdev


# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
_T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_critical_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (a 95% two-sided interval). Beyond 30, the
    Cornish-Fisher expansion around the normal quantile (within 1e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"A t-interval needs at least 1 degree of freedom (2 seeds); got df={df}.")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_with_ci(values: list[float]) -> dict:
    """Mean and 95% t-interval of `values` (the interval is None with fewer than 2 values)."""
    center = mean(values)
    if len(values) < 2:
        return {"mean": center, "ci95": None}
    half = t_critical_975(len(values) - 1) * stdev(values) / math.sqrt(len(values))
    return {"mean": center, "ci95": [center - half, center + half]}


def window_steps(steps: list[int], window: str, early_end: int) -> list[int]:
    if window == "early":
        return [s for s in steps if 0 < s <= early_end]
    if window == "final":
        return steps[-1:]
    return list(steps)


def paired_differences(report_methods: dict, *, baseline: str = "opd", early_end: int) -> dict:
    """For every method other than `baseline` that ran the same seeds and evaluation steps: per window, the per-seed
    difference of mean accuracy (method - baseline), their mean and 95% t-interval. Empty if the baseline did not
    run."""
    if baseline not in report_methods:
        return {}
    base = report_methods[baseline]
    result = {}
    for name, entry in report_methods.items():
        if name == baseline or entry["steps"] != base["steps"] or len(entry["accuracy"]) != len(base["accuracy"]):
            continue
        windows = {}
        for window in ("early", "curve", "final"):
            steps = window_steps(entry["steps"], window, early_end)
            if not steps:
                continue
            indices = [entry["steps"].index(s) for s in steps]
            per_seed = [
                mean(run[i] for i in indices) - mean(ref[i] for i in indices)
                for run, ref in zip(entry["accuracy"], base["accuracy"])
            ]
            windows[window] = {"steps": steps, "per_seed": per_seed, **mean_with_ci(per_seed)}
        result[name] = windows
    return result


def decision(ci95: list[float] | None) -> str:
    """The pre-registered reading of a 95% interval of the paired difference."""
    if ci95 is None:
        return "no interval (one seed)"
    if ci95[0] > 0:
        return "better than vanilla OPD"
    if ci95[1] < 0:
        return "worse than vanilla OPD"
    return "no detectable difference"
