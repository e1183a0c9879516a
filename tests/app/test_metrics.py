"""Metrics on hand-made error curves with hand-computed values; t-intervals on known samples."""

import math

import pytest

from hope_kernels.adapt import StreamLog
from hope_kernels.metrics import (
    adaptation_speed,
    aggregate,
    backward_transfer,
    error_matrix,
    forgetting,
    mean_ci,
    paired_difference,
    phase_means,
    run_metrics,
    running_mean,
    stability_gap,
    t_quantile,
)

#            A1 ---------------  B -------------------------  A2 -----------
ERR = [1.0, 1.0, 1.0, 1.0, 5.0, 4.0, 3.0, 2.0, 2.0, 2.0, 3.0, 2.0, 1.0, 1.0]
PH = ["A1"] * 4 + ["B"] * 6 + ["A2"] * 4


def test_phase_means():
    assert phase_means(ERR, PH) == {"A1": 1.0, "B": 18.0 / 6, "A2": 7.0 / 4}


def test_running_mean():
    assert running_mean([3.0, 1.0, 2.0, 6.0], 2) == [3.0, 2.0, 1.5, 4.0]
    with pytest.raises(ValueError, match="window"):
        running_mean([1.0], 0)


def test_adaptation_speed():
    eb = ERR[4:10]  # 5 4 3 2 2 2; running(3): 5, 4.5, 4, 3, 2.333, 2
    assert adaptation_speed(eb, target=2.0, tol=0.1, window=3) == 6  # 2.333 > 2.2, 2 <= 2.2
    assert adaptation_speed(eb, target=2.2, tol=0.1, window=3) == 5  # 2.333 <= 2.42
    assert adaptation_speed(eb, target=4.5, tol=0.0, window=1) == 2
    assert adaptation_speed(eb, target=1.0, tol=0.1, window=3) == 7  # never: n_B + 1


def test_forgetting_and_stability_gap():
    assert forgetting(ERR, PH, window=2) == pytest.approx(7.0 / 4 - 1.0)
    gaps = stability_gap(ERR, PH, window=2)
    assert gaps["A1->B"] == {"peak": 5.0, "gap": 4.0}
    assert gaps["B->A2"] == {"peak": 3.0, "gap": 1.0}


def test_error_matrix_and_bwt():
    held = {
        "A1": {"A1": {"tf": 1.0}, "B": {"tf": 4.0}, "A2": {"tf": 1.1}},
        "B": {"A1": {"tf": 2.0}, "B": {"tf": 1.5}, "A2": {"tf": 2.1}},
        "A2": {"A1": {"tf": 1.2}, "B": {"tf": 3.0}, "A2": {"tf": 1.0}},
    }
    R = error_matrix(held, ["A1", "B", "A2"])
    assert R[1] == [2.0, 1.5, 2.1]
    # BWT = mean(R[2][0] - R[0][0], R[2][1] - R[1][1]) = mean(0.2, 1.5)
    assert backward_transfer(R) == pytest.approx(0.85)
    with pytest.raises(ValueError, match="square"):
        backward_transfer([[1.0, 2.0]])


def test_t_quantiles_known_values():
    # tables of Student's t, two-sided 95%
    for df, q in [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (30, 2.042272), (1000, 1.962339)]:
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-6)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=2e-6)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)


def test_mean_ci_known_sample():
    # x = 1..5: mean 3, s = sqrt(2.5), half = 2.776445 * sqrt(2.5) / sqrt(5)
    ci = mean_ci([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert ci["mean"] == 3 and ci["n"] == 5
    assert ci["half"] == pytest.approx(half, rel=1e-6)
    assert ci["lo"] == pytest.approx(3 - half, rel=1e-6) and ci["hi"] == pytest.approx(3 + half, rel=1e-6)
    one = mean_ci([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["half"])
    assert mean_ci([])["n"] == 0
    assert mean_ci([1.0, float("nan"), 3.0])["n"] == 2


def test_paired_difference_by_seed():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 5: 9.0}
    b = {0: 0.5, 1: 1.0, 2: 2.5}
    d = paired_difference(a, b)
    assert d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert d["half"] == pytest.approx(t_quantile(0.975, 2) * math.sqrt(1 / 12) / math.sqrt(3), rel=1e-9)


def test_run_metrics_and_aggregate():
    log = StreamLog(
        strategy="x",
        phases=PH,
        tf=ERR,
        rollout=[[e, 2 * e] for e in ERR],
        copy_tf=[10.0] * len(ERR),
        copy_rollout=[[10.0, 10.0]] * len(ERR),
    )
    m = run_metrics(log, oracle_b=2.0, window=3)
    assert m["A1"] == 1.0 and m["B"] == 3.0 and m["copy_B"] == 10.0
    assert m["speed_oracle"] == 6
    assert m["speed_floor"] == 6  # floor = mean(2, 2, 2) = 2
    assert m["forgetting"] == pytest.approx(0.75)
    assert m["gap_A1->B"] == 4.0
    mr = run_metrics(log.to_dict(), metric="rollout", window=3)
    assert mr["A1"] == 1.5
    agg = aggregate({0: {"A1": 1.0}, 1: {"A1": 3.0}, 2: {"A1": 2.0}})
    assert agg["A1"]["mean"] == 2.0 and agg["A1"]["n"] == 3


def test_bad_curves():
    with pytest.raises(ValueError, match="same length"):
        phase_means([1.0], ["A1", "B"])
    with pytest.raises(ValueError, match="phase 'A2'"):
        forgetting([1.0, 2.0], ["A1", "B"])
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.5, 3)
