"""Prometheus metrics of the gateway, exported on /metrics together with vLLM's own `vllm:*` engine metrics.

The gateway's metrics live in a registry of their own (so several apps can exist in one test process);
vLLM registers its gauges and histograms (vllm:num_requests_running, vllm:num_requests_waiting,
vllm:kv_cache_usage_perc, ...) in prometheus_client's default registry, which is appended as is.

With several gateway processes (--api-server-count), prometheus-client's multiprocess mode is on
(PROMETHEUS_MULTIPROC_DIR, set by the parent as vLLM's own server sets it): every process writes its values to
that directory, and /metrics, from whichever process answers, renders every process's series merged: counters
and histograms summed, gauges as each one's `multiprocess_mode` says (in-flight counts summed over live processes,
the start-up phase of the furthest-behind process).
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.0,  # the TTFT SLO of the alerts
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_SAMPLE_EVERY_S = 0.1
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self._rendering: asyncio.Future[bytes] | None = None
        self.front_processes = FrontProcesses()  # with several gateway processes: each one's CPU and memory
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dsv2_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "dsv2_generation_requests_in_flight",
            "Generation requests being served.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sequences_in_flight = Gauge(
            "dsv2_sequences_in_flight",
            "Sequences (prompts x n) of the generation requests being served: the admission budget in use.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight_limit = Gauge(
            "dsv2_inflight_sequences_limit",
            "The admission budget (--max-inflight-sequences): dsv2_sequences_in_flight / this is how full the "
            "pod is, what the autoscaler scales on.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.startup_phase = Gauge(
            "dsv2_startup_phase",
            "1 for the start-up phase the server is in (downloading, loading_weights, compiling, "
            "capturing_graphs, serving), 0 for the others.",
            ["phase"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.startup_progress = Gauge(
            "dsv2_startup_progress_ratio",
            "Progress of the current start-up phase where known (0..1).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.startup_downloaded = Gauge(
            "dsv2_startup_downloaded_bytes",
            "Bytes of the model downloaded (or already present).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.startup_download_size = Gauge(
            "dsv2_startup_download_size_bytes",
            "Bytes of the model to have locally (0: nothing to download).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.aborted = Counter(
            "dsv2_aborted_requests",
            "Engine requests the gateway aborted, by reason (client_disconnected, slow_client, drain_timeout, "
            "deadline, error).",
            ["reason"],
            registry=r,
        )
        self.failures = Counter(
            "dsv2_request_failures",
            "Generation requests that failed after admission, by route and reason (engine_error, engine_dead, "
            "aborted, deadline).",
            ["route", "reason"],
            registry=r,
        )
        self.rejected = Counter(
            "dsv2_rejected_requests", "Requests refused before generation, by reason.", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "dsv2_time_to_first_token_seconds",
            "Request arrival to first generated token.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "dsv2_inter_token_latency_seconds",
            "Time between successive streamed token deliveries.",
            ["route"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "dsv2_event_loop_lag_seconds",
            f"How late a timer set every {LAG_SAMPLE_EVERY_S} s fires on the gateway's event loop: time the loop "
            "spent on work that did not yield (everything a request, a stream or a probe waits behind).",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "dsv2_e2e_request_latency_seconds",
            "Request arrival to last token.",
            ["route"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("dsv2_prompt_tokens", "Prompt tokens processed.", ["route"], registry=r)
        self.generation_tokens = Counter("dsv2_generation_tokens", "Tokens generated.", ["route"], registry=r)
        # Per API key, labelled by the key's name (never the key); "anonymous" on a server without keys.
        self.key_requests = Counter(
            "dsv2_key_requests",
            "Generation requests that ended (completed, failed or abandoned), by API key name.",
            ["key"],
            registry=r,
        )
        self.key_prompt_tokens = Counter(
            "dsv2_key_prompt_tokens", "Prompt tokens charged, by API key name.", ["key"], registry=r
        )
        self.key_generation_tokens = Counter(
            "dsv2_key_generation_tokens",
            "Generated tokens charged (up to where a request ended, however it ended), by API key name.",
            ["key"],
            registry=r,
        )
        self.key_rate_limited = Counter(
            "dsv2_key_rate_limited",
            "Requests refused by their key's own limits (429), by API key name.",
            ["key"],
            registry=r,
        )
        # --rate-limit-store only: no sample at all where the limits are counted in process.
        self.rate_limit_store_errors = Counter(
            "dsv2_rate_limit_store_errors",
            "Per-key limit checks the rate-limit store (--rate-limit-store) failed or was skipped for while down, "
            "by operation (buckets, acquire, release, renew, ping); the request was then admitted uncounted "
            "(--rate-limit-failure open) or refused with 503 (closed).",
            ["operation"],
            registry=r,
        )
        self.rate_limit_store_up = Gauge(
            "dsv2_rate_limit_store_up",
            "1 while the rate-limit store answers, 0 after a failure until it answers again.",
            ["store"],
            registry=r,
        )

    def render(self) -> bytes:
        if (
            "PROMETHEUS_MULTIPROC_DIR" in os.environ
        ):  # several gateway processes: all of theirs, ours and vLLM's
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            merged.register(self.front_processes)
            return generate_latest(merged)
        return generate_latest(self.registry) + generate_latest(REGISTRY)

    async def exposition(self) -> bytes:
        """The /metrics text, rendered in a worker thread so that a scrape never holds the event loop (an endpoint
        picker scrapes every 50 ms); scrapes that arrive while one is rendered share it."""
        if self._rendering is None or self._rendering.done():
            self._rendering = asyncio.ensure_future(asyncio.to_thread(self.render))
        return await asyncio.shield(self._rendering)


class FrontProcesses:
    """prometheus-client's process metrics (process_cpu_seconds_total, process_resident_memory_bytes, ...) of every
    gateway process of the pod, each with `server="api-server-<i>"` (the logs' name): with several processes
    (--api-server-count) they are per process, and multiprocess mode leaves them out. The processes are the
    children of `parent` (the process that started them) that vLLM's process manager titled
    VLLM::APIServer_<i>, found again every REFRESH_S. Each one's CPU near 1 (a core) is a saturated front end."""

    REFRESH_S = 10.0

    def __init__(self, parent: int | None = None) -> None:
        self.parent = parent
        self._found: list[tuple[str, int]] = []
        self._found_at = -self.REFRESH_S

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for server, pid in self._processes():
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "server": server}, sample.value)
        yield from families.values()

    def _processes(self) -> list[tuple[str, int]]:
        if time.monotonic() - self._found_at >= self.REFRESH_S:
            self._found, self._found_at = _titled_children(self.parent or os.getppid()), time.monotonic()
        return self._found


def _titled_children(parent: int) -> list[tuple[str, int]]:
    """("api-server-<i>", pid) of `parent`'s children titled VLLM::APIServer_<i>, in order of i."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rpartition(b")")[2].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0]
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        prefix, _, index = title.partition(b"::APIServer_")
        if prefix and index.isdigit():
            found.append((int(index), entry.name))
    return [(f"api-server-{i}", int(pid)) for i, pid in sorted(found)]


class RequestTimer:
    """TTFT / inter-token / end-to-end timing and token counts of one generation request."""

    __slots__ = (
        "metrics",
        "route",
        "start",
        "start_wall",
        "last",
        "ttft",
        "itl",
        "e2e",
        "flushed",
    )

    def __init__(self, metrics: GatewayMetrics, route: str, latency: bool = True) -> None:
        self.metrics = metrics
        self.route = route
        self.start = time.perf_counter()
        self.start_wall = time.time()
        self.last: float | None = None
        # Batch lines (latency=False) count their tokens but stay out of the latency histograms: those are the
        # interactive traffic's, which the TTFT alert and the dashboards read.
        self.ttft = metrics.ttft.labels(route) if latency else _UNTIMED
        self.itl = _Gathered(metrics.itl.labels(route)) if latency else _UNTIMED
        self.e2e = metrics.e2e.labels(route) if latency else _UNTIMED
        self.flushed = self.start

    def tokens(self) -> None:
        """Called each time new tokens are delivered (streams)."""
        now = time.perf_counter()
        if self.last is None:
            self.ttft.observe(now - self.start)
        else:
            self.itl.observe(now - self.last)
            if now - self.flushed >= ITL_FLUSH_S:
                self.flush()
        self.last = now

    def flush(self) -> None:
        """Add the inter-token latencies gathered so far to the histogram (also when the request ends, however it
        ends: serving closes the timer with the request)."""
        self.itl.flush()
        self.flushed = time.perf_counter()

    def first_token_at(self, wall_time: float | None) -> None:
        """A buffered request's first token, from the engine's own timestamp (wall clock)."""
        if self.last is None:
            self.last = time.perf_counter()
            self.ttft.observe(max(0.0, (wall_time or time.time()) - self.start_wall))

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        m = self.metrics
        self.flush()
        self.e2e.observe(time.perf_counter() - self.start)
        m.prompt_tokens.labels(self.route).inc(prompt_tokens)
        m.generation_tokens.labels(self.route).inc(completion_tokens)

    def failed(self, reason: str) -> None:
        self.metrics.failures.labels(self.route, reason).inc()


# A stream's inter-token latencies reach the histogram at most this long after they happened.
ITL_FLUSH_S = 1.0


class _Gathered:
    """One stream's observations of a histogram child, kept as its bucket counts and sum and added to it in one
    go by flush(): observe() per token costs two locked writes, and with several gateway processes (Prometheus's
    multiprocess values) two memory-mapped writes and two getpid() calls; here a token costs a bisect. The child's
    buckets are prometheus_client's Histogram internals (_upper_bounds, _buckets, _sum)."""

    __slots__ = ("child", "bounds", "counts", "n", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.bounds = child._upper_bounds
        self.counts = [0] * len(self.bounds)
        self.n = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose bound is >= value, as observe() counts it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.n += 1
        self.total += value

    def flush(self) -> None:
        if not self.n:
            return
        buckets = self.child._buckets
        for i, count in enumerate(self.counts):
            if count:
                buckets[i].inc(count)
                self.counts[i] = 0
        self.child._sum.inc(self.total)
        self.n, self.total = 0, 0.0


class _Untimed:
    def observe(self, value: float) -> None:
        pass

    def flush(self) -> None:
        pass


_UNTIMED = _Untimed()


async def sample_loop_lag(histogram: Histogram, every: float = LAG_SAMPLE_EVERY_S) -> None:
    """Forever: sleep `every` seconds and record how much later than asked the loop woke up."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(every)
        histogram.observe(max(0.0, loop.time() - start - every))
