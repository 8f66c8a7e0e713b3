"""Small statistics shared by experiments and tests."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> tuple:
    """95 % Wilson score interval of a binomial proportion k/n, in percent."""
    if n == 0:
        return (0.0, 100.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (100 * max(0.0, mid - half), 100 * min(1.0, mid + half))
