"""stats.py: Wilson score intervals against published values."""
from __future__ import annotations

import pytest

from pinpoint.stats import format_rate, wilson_interval


# Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no
# continuity correction), to the four decimals printed there.
@pytest.mark.parametrize("k, n, low, high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=6e-5) and hi == pytest.approx(high, abs=6e-5)


def test_wilson_edges_and_percent():
    assert wilson_interval(0, 0) is None
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    lo, hi = wilson_interval(5, 10, percent=True)
    assert lo == pytest.approx(23.66, abs=0.01) and hi == pytest.approx(76.34, abs=0.01)
    assert lo + hi == pytest.approx(100.0)  # symmetric around one half


@pytest.mark.parametrize("k, n, exc", [(-1, 5, ValueError), (6, 5, ValueError), (1.0, 5, TypeError),
                                       (True, 5, TypeError)])
def test_wilson_bad_input(k, n, exc):
    with pytest.raises(exc):
        wilson_interval(k, n)


def test_format_rate():
    assert format_rate(None) == "-"
    assert format_rate(61.64, [52.31, 70.12]) == "61.6 [52.3,70.1]"
    assert format_rate(50.0) == "50.0" and format_rate(50.0, [30.0, 70.0]) == "50.0 [30.0,70.0]"


def test_every_rate_of_compute_metrics_has_its_wilson_interval():
    from pinpoint.evaluate import compute_metrics

    # 10 questions: 8 right at first, of those 2 admit a mistake (1 then ends wrong); 2 wrong at
    # first, 1 fixed; every answer parsed, every reply judged
    def s(fc, admits, final):
        return {"first_parsed": True, "first_correct": fc, "admits": admits, "final_parsed": True,
                "final_correct": final}

    samples = [s(True, False, True)] * 6 + [s(True, True, True), s(True, True, False)] + \
              [s(False, False, True), s(False, True, False)]
    m = compute_metrics(samples)
    assert m["confidence"] == 75.0 and m["confidence_ci95"] == pytest.approx(wilson_interval(6, 8, percent=True))
    assert m["apology_rate_ci95"] == pytest.approx(wilson_interval(2, 8, percent=True))
    assert m["truthfulness"] == 80.0 and m["truthfulness_ci95"] == pytest.approx(wilson_interval(8, 10, percent=True))
    assert m["accuracy_before_ci95"] == pytest.approx(wilson_interval(8, 10, percent=True))
    assert m["flip_rate_ci95"] == pytest.approx(wilson_interval(1, 8, percent=True))
    rates = [k for k, v in m.items() if isinstance(v, float)]
    assert rates and all(f"{k}_ci95" in m for k in rates)
    empty = compute_metrics([{**s(False, None, False), "first_parsed": False}])
    assert empty["confidence"] is None and empty["confidence_ci95"] is None


def test_eval_table_prints_intervals():
    from pinpoint.evaluate import EvalReport, compute_metrics

    samples = [{"first_parsed": True, "first_correct": True, "admits": i < 3, "final_parsed": True,
                "final_correct": i >= 3, "dataset": "d"} for i in range(10)]
    report = EvalReport({"all": compute_metrics(samples)}, {}, {}, samples)
    lo, hi = wilson_interval(7, 10, percent=True)
    assert f"70.0 [{lo:.1f},{hi:.1f}]" in report.table(file=None)
