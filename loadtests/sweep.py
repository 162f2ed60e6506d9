"""An open-loop rate sweep: the schedule the arrival user follows, and the numbers of each rate.

Open loop means requests arrive at times drawn in advance, whether or not earlier ones have finished, so a
server that falls behind builds a queue and its latency shows it (closed-loop users would slow down with it
instead). Each rate sends rate x run time requests over its run time, then drains: no new arrivals until every
request it sent has ended (or --request-timeout has passed), so one rate's backlog never lands in the next
one's numbers. The rate's duration runs from its start to its last completion, as in vLLM's `bench serve`.

Per-request values are kept exactly (locust's own tables round response times to two significant digits)
and reduced with the same definitions as vLLM's benchmark:
  TTFT  first token chunk - send;   E2E  last byte of the stream - send;
  TPOT  (last token chunk - first token chunk) / (output tokens - 1), for requests with 2+ tokens;
  ITL   every gap between two token chunks;
  percentiles interpolated linearly (numpy's default, `statistics.quantiles(method="inclusive")`).
Goodput is the share of sent requests that succeeded within every per-request SLO given.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)
ARRIVALS = ("poisson", "constant")


@dataclass
class Record:
    """One request of a rate; times in ms."""

    ok: bool
    start: float  # time.monotonic() when sent
    end: float  # time.monotonic() when the stream ended (or failed)
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def e2e_ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class Phase:
    rate: float
    start: float = 0.0  # perf_counter when the rate began; 0 = not started
    arrivals: list[float] = field(default_factory=list)  # seconds after start, ascending
    sent: int = 0
    records: list[Record] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.rate:g} req/s"

    @property
    def in_flight(self) -> int:
        return self.sent - len(self.records)

    def due(self) -> float | None:
        """When the next request is to be sent (perf_counter), None once all are."""
        return self.start + self.arrivals[self.sent] if self.sent < len(self.arrivals) else None


class Sweep:
    """Rates one after the other: send rate x run_time requests over run_time s, then drain. Driven by the
    load shape's tick().

    Arrival times are drawn when a rate starts; N = rate x run_time, the last one at run_time. Constant: the
    i-th at i / rate. Poisson: the first N - 1 uniform over the window, sorted, which is a Poisson process of
    that rate conditioned on its N-th arrival at run_time. That is what vLLM's benchmark draws (exponential
    gaps rescaled to end at N / rate), so neither the count nor the span varies between runs, and the
    throughput a run allows does not move by +-1/sqrt(N) with them.
    """

    def __init__(
        self, rates: list[float], run_time: float, arrival: str, drain_timeout: float, seed: int = 0
    ):
        if not rates or any(not r > 0 for r in rates):
            raise ValueError(f"LOADTEST_RATES needs rates > 0 (requests/s), got {rates}")
        if arrival not in ARRIVALS:
            raise ValueError(f"LOADTEST_ARRIVAL={arrival!r}; choose one of {ARRIVALS}")
        if not run_time > 0:
            raise ValueError(f"the run time per rate must be > 0 s, got {run_time}")
        self.phases = [Phase(r) for r in rates]
        self.run_time, self.arrival, self.drain_timeout = run_time, arrival, drain_timeout
        self.index = -1  # the phase in progress; len(phases) = done
        self._rng = random.Random(seed)

    @property
    def current(self) -> Phase | None:
        return self.phases[self.index] if 0 <= self.index < len(self.phases) else None

    def advance(self, now: float) -> bool:
        """Start the next rate once the current one has sent everything and drained (or waited drain_timeout
        past its window); False when the sweep is over."""
        phase = self.current
        if phase is not None:
            if phase.due() is not None:
                return True
            if phase.in_flight and now < phase.start + self.run_time + self.drain_timeout:
                return True
        self.index += 1
        phase = self.current
        if phase is None:
            return False
        phase.start, phase.arrivals = now, self.arrivals(phase.rate)
        return True

    def arrivals(self, rate: float) -> list[float]:
        n = max(1, round(rate * self.run_time))
        if self.arrival == "constant":
            return [i / rate for i in range(1, n + 1)]
        return [*sorted(self._rng.uniform(0, self.run_time) for _ in range(n - 1)), self.run_time]


# ---------------------------------------------------------------------------------------------- numbers


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in PERCENTILES} | {"mean": None}
    if len(values) == 1:
        cuts = {q: values[0] for q in PERCENTILES}
    else:
        qs = statistics.quantiles(values, n=100, method="inclusive")
        cuts = {q: qs[q - 1] for q in PERCENTILES}
    return {f"p{q}": round(v, 3) for q, v in cuts.items()} | {"mean": round(statistics.fmean(values), 3)}


@dataclass(frozen=True)
class Goodput:
    """Per-request SLOs (ms); None = not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def good(self, r: Record) -> bool:
        # A request with fewer than 2 tokens has no TPOT and meets that SLO, as in vLLM.
        return r.ok and all(
            limit is None or (value or 0.0) <= limit
            for value, limit in (
                (r.ttft_ms, self.ttft_ms),
                (r.tpot_ms, self.tpot_ms),
                (r.e2e_ms, self.e2e_ms),
            )
        )

    def describe(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}


def summarize(phase: Phase, arrival: str, slos: Goodput) -> dict[str, Any]:
    """One object of sweep.json."""
    done = [r for r in phase.records if r.ok]
    ends = [r.end for r in phase.records]
    duration = (max(ends) - phase.start) if ends else 0.0
    good = sum(slos.good(r) for r in phase.records)
    sent = len(phase.records)

    def per_s(x: float) -> float:
        return round(x / duration, 3) if duration > 0 else 0.0

    return {
        "rate": phase.rate,
        "arrival": arrival,
        "duration_s": round(duration, 3),
        "requests": sent,
        "failures": sent - len(done),
        "ttft_ms": percentiles([r.ttft_ms for r in done if r.ttft_ms is not None]),
        "tpot_ms": percentiles([r.tpot_ms for r in done if r.tpot_ms is not None]),
        "itl_ms": percentiles([gap for r in done for gap in r.itl_ms]),
        "e2e_ms": percentiles([r.e2e_ms for r in done]),
        "request_s": per_s(len(done)),
        "input_tok_s": per_s(sum(r.prompt_tokens for r in done)),
        "output_tok_s": per_s(sum(r.output_tokens for r in done)),
        "input_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": sum(r.output_tokens for r in done),
        "goodput": round(good / sent, 4) if sent else 0.0,
        "good_request_s": per_s(good),
        "slos_ms": slos.describe(),
    }


def tpot_ms(first: float, last: float, tokens: int) -> float | None:
    return (last - first) * 1000 / (tokens - 1) if tokens > 1 else None


def request_row(phase: Phase, r: Record, slos: Goodput) -> dict[str, Any]:
    """One line of requests.jsonl."""
    return {
        "rate": phase.rate,
        "sent_s": round(r.start - phase.start, 4),
        "ok": r.ok,
        "good": slos.good(r),
        "ttft_ms": None if r.ttft_ms is None else round(r.ttft_ms, 3),
        "tpot_ms": None if r.tpot_ms is None else round(r.tpot_ms, 3),
        "e2e_ms": round(r.e2e_ms, 3),
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
    }
