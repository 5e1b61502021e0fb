"""Error bars for the rates pinpoint reports.

Every rate in an evaluation is a share of questions (k of n), so each carries a 95 % Wilson
score interval: unlike the normal-approximation (Wald) interval it stays inside [0, 1], is
not empty at k = 0 or k = n, and keeps close to its nominal coverage at the small n
(~100) of a typical run. (Wilson 1927; Newcombe 1998, "Two-sided confidence intervals for
the single proportion", method 3.)
"""
from __future__ import annotations

import math

__all__ = ["Z95", "wilson_interval", "format_rate"]

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson_interval(k: int, n: int, *, z: float = Z95, percent: bool = False) -> list[float] | None:
    """The Wilson score interval [low, high] for ``k`` successes in ``n`` trials (fractions,
    or percentages with ``percent=True``); None when ``n`` is 0.

    low, high = (p + z²/2n ∓ z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n),  p = k/n.
    """
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"wilson_interval: {name} must be an int, got {v!r}")
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # the exact ends at k = 0 and k = n are 0 and 1; rounding would leave 1e-17 either side
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    scale = 100.0 if percent else 1.0
    return [lo * scale, hi * scale]


def format_rate(value: float | None, ci: list[float] | None = None, digits: int = 1) -> str:
    """"61.6 [52.3,70.1]" (a rate with its interval), "61.6" without one, "-" for None."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    if ci is not None:
        text += f" [{ci[0]:.{digits}f},{ci[1]:.{digits}f}]"
    return text
