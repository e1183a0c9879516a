"""A-B-A metrics on per-clip error curves (docs/design.md#metrics). Plain Python on lists of floats, so every number
can be checked by hand.

Per run (one strategy, one seed), from the error curve e[0..n) and the phase label of each clip:
  phase_means        mean online error of each phase
  adaptation speed   clips into B until the running error (trailing mean over `window` clips) is within
                     `tol` (10%) of a target: the oracle's B error, and the run's own B floor (mean of its last
                     `window` B clips). Never reached: reported as n_B + 1 (censored).
  forgetting         mean error over A2 - A1 end error (mean of the last `window` A1 clips). > 0 = forgot.
  stability gap      per switch: peak error over the first `window` clips of the new phase minus the mean of
                     the last `window` clips before the switch.
  backward transfer  BWT = mean_{j < last} (R[last][j] - R[j][j]) on the held-out error matrix (errors, so
                     > 0 means phases learned earlier got worse by the end).
Across seeds: mean and 95% confidence interval with the Student t-distribution; strategy comparisons as the
CI of the per-seed paired differences.

Non-finite clip scores (a clip so extreme that its prediction overflows) are left out of every mean here and
counted instead (`nonfinite_counts`, run_metrics' "nonfinite"); a phase with no finite score is an error that
names it, so no reported mean is ever NaN.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = [
    "phase_means",
    "nonfinite_counts",
    "running_mean",
    "adaptation_speed",
    "forgetting",
    "stability_gap",
    "error_matrix",
    "backward_transfer",
    "t_quantile",
    "mean_ci",
    "paired_difference",
    "run_metrics",
    "aggregate",
]


def _check_curve(errors, phases) -> None:
    if len(errors) != len(phases):
        raise ValueError(f"errors and phases must have the same length, got {len(errors)} and {len(phases)}")
    if not errors:
        raise ValueError("the error curve is empty")


def _segments(phases: Sequence[str]) -> list[tuple[str, int, int]]:
    """[(phase, start, stop)] of consecutive runs of the same label, in order."""
    segs, start = [], 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            segs.append((phases[start], start, i))
            start = i
    return segs


def _mean(xs) -> float:
    """Mean of the finite values of xs (NaN only when none is finite)."""
    xs = list(xs)
    if not xs:
        raise ValueError("mean of an empty list")
    kept = [float(x) for x in xs if math.isfinite(float(x))]
    return sum(kept) / len(kept) if kept else math.nan


def _by_phase(errors, phases) -> dict[str, list]:
    _check_curve(errors, phases)
    out: dict[str, list] = {}
    for e, p in zip(errors, phases):
        out.setdefault(p, []).append(e)
    return out


def phase_means(errors: Sequence[float], phases: Sequence[str]) -> dict[str, float]:
    """{phase: mean error over its clips with a finite score} (a phase appearing twice is pooled)."""
    out = _by_phase(errors, phases)
    for p, v in out.items():
        if not any(math.isfinite(float(x)) for x in v):
            raise ValueError(f"none of the {len(v)} clip scores of phase {p!r} is finite: no mean to report")
    return {p: _mean(v) for p, v in out.items()}


def nonfinite_counts(errors: Sequence[float], phases: Sequence[str]) -> dict[str, int]:
    """{phase: number of its clips whose score is NaN or Inf (left out of the means)}."""
    return {p: sum(not math.isfinite(float(x)) for x in v) for p, v in _by_phase(errors, phases).items()}


def running_mean(errors: Sequence[float], window: int) -> list[float]:
    """Trailing mean: r[i] = mean(errors[max(0, i-window+1) : i+1])."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [_mean(errors[max(0, i - window + 1) : i + 1]) for i in range(len(errors))]


def adaptation_speed(errors_b: Sequence[float], target: float, tol: float = 0.1, window: int = 3) -> int:
    """Number of B clips (1-based) until the running error <= (1 + tol) * target; len(errors_b) + 1 if never."""
    for i, r in enumerate(running_mean(errors_b, window)):
        if r <= (1.0 + tol) * target:
            return i + 1
    return len(errors_b) + 1


def _phase_slice(errors, phases, name):
    for p, a, b in _segments(phases):
        if p == name:
            return list(errors[a:b])
    raise ValueError(f"phase {name!r} is not in the stream (it has {sorted(set(phases))})")


def forgetting(
    errors: Sequence[float], phases: Sequence[str], window: int = 3, first: str = "A1", last: str = "A2"
) -> float:
    """mean(errors over `last`) - mean(last `window` errors of `first`)."""
    _check_curve(errors, phases)
    return _mean(_phase_slice(errors, phases, last)) - _mean(_phase_slice(errors, phases, first)[-window:])


def stability_gap(errors: Sequence[float], phases: Sequence[str], window: int = 3) -> dict[str, dict]:
    """{"A1->B": {"peak": ..., "gap": ...}, ...}: peak of the first `window` clips after each switch and its
    excess over the mean of the last `window` clips before the switch."""
    _check_curve(errors, phases)
    segs = _segments(phases)
    out = {}
    for (p0, a0, b0), (p1, a1, b1) in zip(segs, segs[1:]):
        before = _mean(errors[max(a0, b0 - window) : b0])
        peak = max((e for e in errors[a1 : min(b1, a1 + window)] if math.isfinite(e)), default=math.nan)
        out[f"{p0}->{p1}"] = {"peak": peak, "gap": peak - before}
    return out


def error_matrix(
    heldout: Mapping[str, Mapping[str, Mapping[str, float]]], order: Sequence[str], metric: str = "tf"
) -> list[list[float]]:
    """R[i][j] = held-out error on phase order[j] after the end of phase order[i] (NaN where missing)."""
    return [[float(heldout.get(pi, {}).get(pj, {}).get(metric, math.nan)) for pj in order] for pi in order]


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """BWT = mean_{j < n-1} (R[n-1][j] - R[j][j]) (errors: > 0 = earlier phases got worse)."""
    n = len(R)
    if n < 2 or any(len(r) != n for r in R):
        raise ValueError(f"R must be a square matrix with >= 2 rows, got {[len(r) for r in R]}")
    return _mean(R[n - 1][j] - R[j][j] for j in range(n - 1))


# ------------------------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with `df` degrees of freedom (bisection on the CDF, |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_ci(samples: Sequence[float], level: float = 0.95) -> dict:
    """{"mean", "lo", "hi", "half", "n", "std"}: t-interval mean +- t_{(1+level)/2, n-1} * s / sqrt(n).
    One sample: half-width NaN (no spread to estimate). NaN samples are dropped."""
    xs = [float(x) for x in samples if x is not None and math.isfinite(float(x))]
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "half": math.nan, "n": 0, "std": math.nan}
    m = _mean(xs)
    if n == 1:
        return {"mean": m, "lo": math.nan, "hi": math.nan, "half": math.nan, "n": 1, "std": math.nan}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "half": half, "n": n, "std": sd}


def paired_difference(a: Mapping, b: Mapping, level: float = 0.95) -> dict:
    """CI of a[seed] - b[seed] over the seeds both have."""
    seeds = sorted(set(a) & set(b), key=str)
    out = mean_ci([a[s] - b[s] for s in seeds], level)
    out["seeds"] = seeds
    return out


# --------------------------------------------------------------------------------------- whole runs


def run_metrics(
    log,
    oracle_b: float | None = None,
    metric: str = "tf",
    window: int = 3,
    tol: float = 0.1,
    order: Sequence[str] | None = None,
) -> dict[str, float]:
    """Flat {name: value} metrics of one StreamLog (or its dict) on error `metric` ("tf" | "rollout" | ...)."""
    from hope_kernels.adapt import StreamLog

    if isinstance(log, dict):
        log = StreamLog.from_dict(log)
    errors, phases = log.errors(metric), list(log.phases)
    order = list(order) if order else [p for p, _, _ in _segments(phases)]
    out = {f"{p}": v for p, v in phase_means(errors, phases).items()}
    out["nonfinite"] = float(sum(nonfinite_counts(errors, phases).values()))
    copy = phase_means(log.errors("copy_" + ("rollout" if metric.startswith("rollout") else "tf")), phases)
    out.update({f"copy_{p}": v for p, v in copy.items()})
    if "B" in phases:
        eb = _phase_slice(errors, phases, "B")
        floor = _mean(eb[-window:])
        out["speed_floor"] = adaptation_speed(eb, floor, tol, window)
        if oracle_b is not None:
            out["speed_oracle"] = adaptation_speed(eb, oracle_b, tol, window)
    if "A1" in phases and "A2" in phases:
        out["forgetting"] = forgetting(errors, phases, window)
    for k, v in stability_gap(errors, phases, window).items():
        out[f"gap_{k}"] = v["gap"]
        out[f"peak_{k}"] = v["peak"]
    if log.heldout:
        R = error_matrix(log.heldout, order, "rollout" if metric.startswith("rollout") else "tf")
        for i, pi in enumerate(order):
            for j, pj in enumerate(order):
                out[f"R_{pi}_{pj}"] = R[i][j]
        if len(order) >= 2 and all(not math.isnan(x) for r in R for x in r):
            out["bwt"] = backward_transfer(R)
    out["rollbacks"] = float(log.rollbacks)
    return out


def aggregate(per_seed: Mapping[object, Mapping[str, float]], level: float = 0.95) -> dict[str, dict]:
    """{seed: {name: value}} -> {name: mean_ci over seeds}."""
    names: list[str] = []
    for m in per_seed.values():
        names += [k for k in m if k not in names]
    return {k: mean_ci([m[k] for m in per_seed.values() if k in m], level) for k in names}
