"""The autoscaler's signals against a real Prometheus scraping a real gateway under load: with the overlays'
relation (admission budget = 1.5 x vLLM's --max-num-seqs), a full batch stays under the KEDA utilisation
trigger's threshold, load beyond it crosses it and queues in vLLM (what the picker's queue scorer and the
waiting-requests trigger read), and load beyond the budget is refused with 429.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.test_gateway_engine import MODEL, Server, module_server
from tests.test_observability import Prometheus

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
SCALEDOBJECT = ROOT / "deploy" / "components" / "keda" / "scaledobject.yaml"
BATCH = 2  # --max-num-seqs
BUDGET = 3  # --max-inflight-sequences: 1.5 x the batch, as the GPU overlays set it
SERVICE = "dsv2-serve"  # the Service name the component's queries carry (overlays rename it)
LONG_TOKENS = (
    3000  # each stream's length: tens of seconds of decoding on the tiny model, longer than each phase
)

server = module_server(
    "autoscale",
    "--max-num-seqs",
    str(BATCH),
    "--max-inflight-sequences",
    str(BUDGET),
    "--max-sequences-per-request",
    "1",
    "--max-model-len",
    str(LONG_TOKENS + 64),
)


def triggers() -> dict[str, dict]:
    spec = yaml.safe_load(SCALEDOBJECT.read_text())["spec"]
    return {t.get("name", t["metadata"]["query"]): t for t in spec["triggers"]}


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    work = tmp_path_factory.mktemp("prometheus")
    target = {"targets": [server.url.removeprefix("http://")], "labels": {"service": SERVICE, "pod": "p-0"}}
    config = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": SERVICE, "static_configs": [target]}],
    }
    prom = Prometheus(work, config)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if prom.query(f'up{{job="{SERVICE}"}} == 1'):
                break
        except (httpx.HTTPError, AssertionError):
            pass
        time.sleep(0.5)
    try:
        yield prom
    finally:
        prom.stop()


def peak(prom: Prometheus, expr: str, start: float, end: float) -> float:
    """The largest value `expr` took between two wall-clock times (a subquery at 250 ms steps)."""
    window = max(1, int(end - start + 1))
    result = prom.query(f"max_over_time(({expr})[{window}s:250ms])", at=end)
    assert result, f"no data for {expr}"
    return float(result[0]["value"][1])


class Streams:
    """`count` long generations, each in a thread, read until `stop()` (the gateway then aborts the rest)."""

    def __init__(self, server: Server, count: int) -> None:
        self.status: list[int] = []
        self.ended: list[float] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._one, args=(server,)) for _ in range(count)]
        for t in self.threads:
            t.start()

    def _one(self, server: Server) -> None:
        body = {
            "model": MODEL,
            "prompt": "the",
            "max_tokens": LONG_TOKENS,
            "min_tokens": LONG_TOKENS,
            "stream": True,
        }
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=300) as r:
            for _ in r.iter_bytes():
                if self.stopping.is_set():
                    break
            self.status.append(r.status_code)
        self.ended.append(time.time())

    def stop(self) -> list[int]:
        self.stopping.set()
        for t in self.threads:
            t.join(300)
        return sorted(self.status)


def wait_for(prom: Prometheus, expr: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prom.query(expr):
            return
        time.sleep(0.25)
    raise AssertionError(f"never true: {expr}")


def test_utilisation_trigger_crosses_its_threshold_only_beyond_a_full_batch(
    server: Server, prometheus: Prometheus
) -> None:
    trigger = triggers()["admission-utilization"]
    assert trigger["metricType"] == "Value"
    utilisation, threshold = trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])
    waiting = next(t for t in triggers().values() if "num_requests_waiting" in t["metadata"]["query"])
    waiting_expr = waiting["metadata"]["query"]
    assert BATCH / BUDGET < threshold < 1, "a full batch must stay under the threshold, the budget cross it"

    # Idle: the trigger reads 0 (a value, not an empty result: the limit gauge is always there).
    wait_for(prometheus, f"({utilisation}) == 0")

    # A full batch: running, nothing waits, utilisation 2/3 stays under the threshold.
    start = time.time()
    full = Streams(server, BATCH)
    wait_for(prometheus, f'sum(vllm:num_requests_running{{service="{SERVICE}"}}) == {BATCH}')
    time.sleep(2)
    end = time.time()
    assert peak(prometheus, utilisation, start, end) == pytest.approx(BATCH / BUDGET)
    assert peak(prometheus, utilisation, start, end) < threshold
    assert peak(prometheus, waiting_expr, start, end) == 0

    # Beyond the batch: the third waits in vLLM's queue, utilisation 1.0 crosses the threshold, a fourth is 429.
    start = time.time()
    beyond = Streams(server, 1)
    wait_for(prometheus, f"({utilisation}) > {threshold}")
    refused = httpx.post(
        f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "the", "max_tokens": 4}, timeout=60
    )
    assert refused.status_code == 429, refused.text
    time.sleep(1.5)
    end = time.time()
    assert peak(prometheus, utilisation, start, end) == pytest.approx(1.0)
    assert peak(prometheus, waiting_expr, start, end) >= 1
    assert peak(prometheus, 'sum(dsv2_rejected_requests_total{reason="overloaded"})', start, end) >= 1
    assert not full.ended, "a stream of the full batch ended before the measurements did"
    assert full.stop() == [200] * BATCH and beyond.stop() == [200]
