"""The acceptance rule: a measured score passes when it is no more than K standard errors below the card's.

With K = 2 a deployment that truly scores what the card says fails a task about 2.3% of the time (one-sided,
normal approximation); a smaller --limit widens the standard error and so the tolerance. Scores are in points
(0-100), as on the card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

K_STDERR = 2.0

WITHIN, ABOVE, BELOW, NO_CARD, SKIPPED, ERROR = "within", "above", "below", "no card", "skipped", "error"
FAILING = {BELOW}


@dataclass(frozen=True)
class Verdict:
    verdict: (
        str  # within | above | below | no card | skipped (error: set by the caller when a task fails to run)
    )
    delta: float | None  # measured - card, points
    tolerance: float | None  # K x standard error, points


def judge(measured: float | None, stderr: float | None, card: float | None, k: float = K_STDERR) -> Verdict:
    """`measured` and `stderr` in points; a missing or non-finite stderr gives no tolerance at all."""
    if measured is None:
        return Verdict(SKIPPED, None, None)
    if card is None:
        return Verdict(NO_CARD, None, None)
    se = stderr if stderr is not None and math.isfinite(stderr) else 0.0
    delta = measured - card
    tolerance = k * se
    if delta < -tolerance:
        return Verdict(BELOW, delta, tolerance)
    return Verdict(ABOVE if delta > tolerance else WITHIN, delta, tolerance)
