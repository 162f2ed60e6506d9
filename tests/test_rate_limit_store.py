"""Per-key limits shared through a real Redis (Debian's `redis-server`, scripts/install-redis.sh; no fakeredis):
first the Lua scripts' semantics against the server (buckets that refill, refunds capped at the capacity, expiry,
leases that count costs, lapse and renew, a store that fails and comes back), then gateway processes sharing one
Redis: a key's requests per minute, tokens per minute (reserved, then refunded) and max_sequences hold across two
of them, the sequences of a SIGKILLed one come back after its lease, the x-ratelimit-* headers read the shared
state, and with Redis killed `closed` refuses (503) while `open` admits, both enforcing again once Redis is back.

The tests start their own redis-server (on a free port, in a temporary directory, without persistence). The
gateway processes serve FakeEngine, a fake engine for HTTP tests only, through this module's launcher
(`python -m tests.test_rate_limit_store '<json>'`: create_app over FakeEngine, served by uvicorn as run() serves
it), since `python -m server serve` always builds vLLM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from server.gateway.metrics import GatewayMetrics
from server.gateway.ratelimits import StoreUnavailable, Window
from server.gateway.tenants import Tenant
from tests import ports

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
MODEL = "tiny"
# The gateways' --rate-limit-lease-seconds: renewed every 1 s (room for a loaded machine's stalls).
LEASE_S = 3.0
# FakeEngine's delay per word (6 words): a full answer takes 3 s, one of max_tokens 1 takes 0.5 s.
STEP_S = 0.5
KEYS = """\
free: sk-free
rpm3:
  key: sk-rpm3
  requests_per_minute: 3
tok:
  key: sk-tok
  tokens_per_minute: 60
seq:
  key: sk-seq
  max_sequences: 1
lease:
  key: sk-lease
  max_sequences: 1
heads:
  key: sk-heads
  requests_per_minute: 10
  tokens_per_minute: 600
down:
  key: sk-down
  requests_per_minute: 3
all:
  key: sk-all
  requests_per_minute: 2
  tokens_per_minute: 600
  max_sequences: 2
bad:
  key: sk-bad
  requests_per_minute: 5
"""
QUICK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
STREAM = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


class RedisServer:
    """redis-server on a port of its own, without persistence; `kill` and `start` again on the same port."""

    def __init__(self) -> None:
        if not os.access(REDIS_SERVER, os.X_OK):
            pytest.skip(
                "Redis not installed: scripts/install-redis.sh could not install Debian's redis-server"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="dsv2-redis-"))
        self.port = ports.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with suppress(Exception), self.client() as r:
                if r.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{ports.tail(self.dir / 'redis.log')}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


def test_flags_and_environment(monkeypatch, tiny_lite_dir):
    """--rate-limit-store (DSV2_RATE_LIMIT_STORE) takes redis://, rediss:// and unix:// URLs and nothing else;
    --rate-limit-failure defaults to open; without a store the counts stay in the process."""
    from server.gateway.ratelimits import LocalCounters, rate_limits
    from server.settings import Settings
    from tests.test_gateway_settings import parse

    model = ["--model", str(tiny_lite_dir)]
    s = parse(model)
    assert s.rate_limit_store is None and s.rate_limit_failure == "open" and s.rate_limit_lease_seconds == 30
    assert isinstance(rate_limits(s, GatewayMetrics()).counters, LocalCounters)
    monkeypatch.setenv("DSV2_RATE_LIMIT_STORE", "rediss://:secret@redis.example:6380/2")
    monkeypatch.setenv("DSV2_RATE_LIMIT_FAILURE", "closed")
    s = parse([*model, "--rate-limit-lease-seconds", "5"])
    assert s.rate_limit_store == "rediss://:secret@redis.example:6380/2" and s.rate_limit_failure == "closed"
    limits = rate_limits(s, GatewayMetrics())
    assert limits.counters.store == "rediss://redis.example:6380/2" and not limits.fail_open  # no password
    assert limits.counters.lease_ms == 5000
    s = parse([*model, "--rate-limit-store", "unix:///run/redis.sock?db=1", "--rate-limit-failure", "open"])
    assert s.rate_limit_store == "unix:///run/redis.sock?db=1" and s.rate_limit_failure == "open"
    with pytest.raises(ValueError, match="expected a Redis URL"):
        Settings(model=str(tiny_lite_dir), rate_limit_store="http://redis:6379")
    with pytest.raises(SystemExit):
        parse([*model, "--rate-limit-failure", "ajar"])


# --- the Lua scripts, against the real server ---------------------------------------------------------------------


def counters(url: str, lease_seconds: float = 30.0, metrics: GatewayMetrics | None = None):
    from server.gateway.ratelimit_store import RedisCounters

    return RedisCounters(url, metrics or GatewayMetrics(), lease_seconds, fail_open=True)


async def test_buckets_refill_refund_to_capacity_and_expire(redis_server):
    store = counters(redis_server.url)
    key = Tenant("lua-bucket", b"", requests_per_minute=6, tokens_per_minute=600)
    requests, tokens = "dsv2:ratelimit:{lua-bucket}:requests", "dsv2:ratelimit:{lua-bucket}:tokens"
    with redis_server.client() as r:
        # Full at start, and a look writes nothing.
        looked = await store.take(key, {"requests": 0, "tokens": 0}, fit=True)
        assert looked.windows == {"requests": Window(6, 6, 0.0), "tokens": Window(600, 600, 0.0)}
        assert not r.exists(requests, tokens)
        for left in range(5, -1, -1):
            taken = await store.take(key, {"requests": 1}, fit=True)
            assert taken.refused is None and taken.windows["requests"].remaining == left
        refused = await store.take(key, {"requests": 1}, fit=True)
        assert refused.refused == "requests" and 9.9 <= refused.wait <= 10.0  # 0.1 a second
        # Expires when it would be full again (a minute from empty), plus a second: an idle key costs nothing.
        assert 59_000 <= r.pttl(requests) <= 61_000
        # Refill: as if 25 s had passed, 2.5 requests are back.
        r.hset(requests, "t", float(r.hget(requests, "t")) - 25_000)
        assert (await store.take(key, {"requests": 0}, fit=True)).windows["requests"].remaining == 2
        # A refund never fills a bucket above its capacity; a full bucket expires within a second.
        back = await store.take(key, {"requests": -100}, fit=False)
        assert back.windows["requests"] == Window(6, 6, 0.0)
        assert 0 < r.pttl(requests) <= 1000
        # All or nothing: the tokens cannot take 700 of 600, so no request is taken either.
        both = await store.take(key, {"requests": 1, "tokens": 700}, fit=True)
        assert both.refused == "tokens" and both.windows["requests"].remaining == 6
        assert not r.exists(tokens)
        # A settlement may overdraw (charged more than reserved): a look still answers, a take waits for the debt.
        await store.take(key, {"tokens": 700}, fit=False)
        looked = await store.take(key, {"tokens": 0}, fit=True)
        assert looked.refused is None and looked.windows["tokens"].remaining == 0
        owed = await store.take(key, {"tokens": 1}, fit=True)
        assert owed.refused == "tokens" and 10.0 <= owed.wait <= 10.1  # 101 tokens at 10 a second
    await store.close()


async def acquire(store, key: Tenant, cost: int):
    """`cost` of the key's max_sequences alone: (the lease or None, the sequences held)."""
    taken = await store.take(key, {}, fit=True, sequences=cost)
    assert (taken.refused == "sequences") == (taken.lease is None)
    return taken.lease, taken.held


async def test_leases_count_costs_lapse_and_renew(redis_server):
    # Not opened: renewed by hand below. Leases of 6 s leave a loaded machine's stalls (a CI run beside a
    # benchmark) a wide margin.
    lease = 6.0
    store = counters(redis_server.url, lease_seconds=lease)
    key = Tenant("lua-seq", b"", max_sequences=3)
    leases = "dsv2:ratelimit:{lua-seq}:sequences"
    with redis_server.client() as r:
        two, held = await acquire(store, key, 2)
        assert two is not None and held == 2
        assert await acquire(store, key, 2) == (None, 2)  # 2 + 2 > 3
        one, held = await acquire(store, key, 1)
        assert one is not None and held == 3
        assert r.zcard(leases) == 2 and 0 < r.pttl(leases) <= lease * 1000 + 50  # lapses with its last lease
        # Renewed within the lease, they outlive it.
        await asyncio.sleep(lease * 0.6)
        await store.renew()
        await asyncio.sleep(lease * 0.6)
        assert await acquire(store, key, 1) == (None, 3)
        # Released: free at once, and a renewal does not bring it back.
        store.release(two)
        await gone(lambda: r.zscore(leases, two.member) is None)
        await store.renew()
        assert r.zscore(leases, two.member) is None
        # A holder that stops renewing (a killed gateway): its leases lapse, and the next acquire drops them.
        await asyncio.sleep(lease + 0.1)
        three, held = await acquire(store, key, 3)
        assert three is not None and held == 3 and r.zcard(leases) == 1
    await store.close()


async def gone(condition: Callable[[], bool]) -> None:
    """Wait (on the loop, so that a release task runs) until `condition()` holds, at most 2 s."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 2 s")


@pytest.mark.parametrize("where", ["process", "redis"])
async def test_one_flow_over_either_counters(where, redis_server):
    """RateLimits decides the same over the in-process counters and over Redis: the same answers, messages and
    headers from one take per admission; only where the counts live differs."""
    from server.gateway.errors import APIError
    from server.gateway.ratelimits import Account, LocalCounters, RateLimits, headers

    metrics = GatewayMetrics()
    store = LocalCounters() if where == "process" else counters(redis_server.url, metrics=metrics)
    takes = []
    take = store.take
    store.take = lambda *args, **kwargs: takes.append(args[1:]) or take(*args, **kwargs)
    limits = RateLimits(store, metrics, fail_open=False)
    key = Tenant(f"flow-{where}", b"", requests_per_minute=3, tokens_per_minute=100, max_sequences=1)
    one = Account()

    # One take for all three limits: a request, 80 tokens reserved, one sequence leased.
    admitted = await limits.admit(key, one, tokens=80, sequences=1)
    assert admitted.reserved == 80 and admitted.lease is not None and len(takes) == 1
    assert one.checked and headers(one.windows)["x-ratelimit-remaining-requests"] == "2"
    assert headers(one.windows)["x-ratelimit-remaining-tokens"] == "20"
    # All or nothing: refused for its sequence, it takes no request and reserves no token.
    with pytest.raises(APIError) as busy:
        await limits.admit(key, Account(), tokens=10, sequences=1)
    assert busy.value.status == 429 and "has 1 of its 1 sequences in flight" in busy.value.message
    assert busy.value.headers["Retry-After"] == "1"
    assert busy.value.headers["x-ratelimit-remaining-requests"] == "2"
    with pytest.raises(APIError) as short:
        await limits.admit(key, Account(), tokens=30)
    assert short.value.status == 429 and "(tokens per minute): 20 of 100 left" in short.value.message
    with pytest.raises(APIError) as never:  # no wait makes it fit: a 400, and no take
        await limits.admit(key, Account(), tokens=101)
    assert never.value.status == 400 and never.value.param == "max_tokens" and len(takes) == 3
    await limits.settle_tokens(key, admitted.reserved, 10, one)  # 70 back
    assert 90 <= one.windows["tokens"].remaining <= 91  # 100 a minute: under 2 a second refilled meanwhile
    limits.release_sequences(admitted.lease)
    await gone(lambda: store.sequences.get(key.name, 0) == 0 if where == "process" else not store._releases)

    # Not charged (a batch line): its sequences count, its requests and tokens do not.
    free = await limits.admit(key, Account(), tokens=50, sequences=1, charged=False)
    assert free.reserved is None and free.lease is not None
    limits.release_sequences(free.lease)
    await gone(lambda: store.sequences.get(key.name, 0) == 0 if where == "process" else not store._releases)

    # The key's last request: the bucket is under one request now, and only time refills it, so its next
    # requests are refused before their bodies, by this process alone, without a take.
    await limits.admit(key, Account(), tokens=5)
    last = Account()
    held = await limits.admit(key, last, tokens=5, sequences=1)
    assert last.windows["requests"].remaining == 0
    limits.release_sequences(held.lease)
    count = len(takes)
    early = Account()
    spent = limits.refuse_spent(key, early)
    assert spent is not None and spent.status == 429 and "requests per minute" in spent.message
    assert 1 <= int(spent.headers["Retry-After"]) <= 20  # 3 a minute: one every 20 s
    assert spent.headers["x-ratelimit-remaining-requests"] == "0" and early.checked and len(takes) == count
    assert limits.refuse_spent(Tenant(key.name, b"", requests_per_minute=1000), Account()) is None  # reloaded
    # A request that ended before its check (a bad body) is one of the key's requests, when one is left.
    other = Tenant(f"flow-{where}-2", b"", requests_per_minute=2)
    bad = Account()
    await limits.peek(other, bad, metered=True)
    await limits.peek(other, bad, metered=True)  # once only
    assert bad.checked and bad.windows["requests"].remaining == 1
    assert metrics.key_rate_limited.labels(key.name)._value.get() == 4
    await limits.close()


async def test_admission_takes_all_or_nothing_in_one_script(redis_server):
    """The admission's script: requests, tokens and a lease together, or none of them; and what refused."""
    store = counters(redis_server.url)
    key = Tenant("lua-admit", b"", requests_per_minute=5, tokens_per_minute=100, max_sequences=2)
    leases = "dsv2:ratelimit:{lua-admit}:sequences"
    with redis_server.client() as r:
        taken = await store.take(key, {"requests": 1, "tokens": 60}, fit=True, sequences=2)
        assert taken.refused is None and taken.held == 2 and r.zcard(leases) == 1
        assert taken.windows == {"requests": Window(5, 4, 12.0), "tokens": Window(100, 40, 36.0)}
        sequences = await store.take(key, {"requests": 1, "tokens": 10}, fit=True, sequences=1)
        assert sequences.refused == "sequences" and sequences.held == 2 and sequences.lease is None
        tokens = await store.take(key, {"requests": 1, "tokens": 50}, fit=True, sequences=1)
        assert tokens.refused == "tokens" and 5.9 <= tokens.wait <= 6.1
        looked = await store.take(key, {"requests": 0, "tokens": 0}, fit=True)
        assert looked.windows["requests"].remaining == 4 and looked.windows["tokens"].remaining == 40
        assert r.zcard(leases) == 1 and not store.leases.get(leases, set()) - {taken.lease.member}
    await store.close()


async def test_a_store_that_fails_fails_fast_and_comes_back():
    own = RedisServer()  # its own: killed and started again
    metrics = GatewayMetrics()
    store = counters(own.url, metrics=metrics)
    key = Tenant("lua-down", b"", requests_per_minute=60)
    try:
        assert (await store.take(key, {"requests": 1}, fit=True)).windows["requests"].remaining == 59
        own.kill()
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as failed:
                await store.take(key, {"requests": 1}, fit=True)
            assert time.monotonic() - started < 0.6 and failed.value.store == own.url
        text = metrics.render().decode()
        assert 'dsv2_rate_limit_store_errors_total{operation="buckets"} 3.0' in text
        assert f'dsv2_rate_limit_store_up{{store="{own.url}"}} 0.0' in text
        own.start()  # empty: the scripts are loaded again, on a new connection of the same client
        await asyncio.sleep(1.1)  # past the hold-down after a failure
        assert (await store.take(key, {"requests": 1}, fit=True)).windows["requests"].remaining == 59
        assert f'dsv2_rate_limit_store_up{{store="{own.url}"}} 1.0' in metrics.render().decode()
    finally:
        await store.close()
        own.stop()


# --- gateway processes over FakeEngine, sharing one Redis ---------------------------------------------------------


def serve_fake_engine(config: dict) -> None:
    """A gateway process over FakeEngine, for these HTTP tests only: create_app(settings, engine=FakeEngine())
    served by uvicorn with the gateway's own config, as run() serves the real engine."""
    import uvicorn

    from server.gateway import connections
    from server.gateway.app import create_app
    from server.gateway.logs import configure_logging
    from server.settings import Settings
    from tests.fake_engine import FakeEngine

    settings = Settings(**config["settings"])
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, engine=FakeEngine(delay=config["delay"]))
    uvicorn.Server(connections.config(app, settings)).run()


class Gateway:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def post(self, key: str, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=bearer(key), timeout=30)

    def models(self, key: str) -> httpx.Response:
        return httpx.get(f"{self.url}/v1/models", headers=bearer(key), timeout=30)

    @contextmanager
    def held_stream(self, key: str, body: dict) -> Iterator[Callable[[], None]]:
        """A stream admitted (its first event read) for the block; the block may call the function it is given
        to read the stream to its end."""
        with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{self.url}/v1/chat/completions", json=body, headers=bearer(key)
        ) as response:  # fmt: skip
            assert response.status_code == 200, response.read()
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            yield lambda: [None for _ in lines]

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            series, _, value = line.rpartition(" ")
            if series == name or series.startswith(f"{name}{{") and want in series:
                total += float(value)
        return total

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_gateway(model_dir: Path, workdir: Path, name: str, redis_url: str, failure: str) -> Gateway:
    keys = workdir / "keys.yaml"
    keys.write_text(KEYS)
    log = workdir / f"gateway-{name}.log"

    def start(port: int) -> subprocess.Popen:
        settings = {
            "model": str(model_dir),
            "served_model_name": MODEL,
            "port": port,
            "api_key_file": str(keys),
            "rate_limit_store": redis_url,
            "rate_limit_failure": failure,
            "rate_limit_lease_seconds": LEASE_S,
            "playground": False,
        }
        config = json.dumps({"settings": settings, "delay": STEP_S})
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.test_rate_limit_store", config],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )

    def ready(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    proc, port = ports.launch(start, log, ready, timeout=180)
    return Gateway(proc, port, log)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rate-limit-store")


@pytest.fixture(scope="module")
def gateways(redis_server, tiny_lite_dir, workdir) -> Iterator[tuple[Gateway, Gateway]]:
    """A fails closed, B fails open; both count in the same Redis."""
    with ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(start_gateway, tiny_lite_dir, workdir, name, redis_server.url, failure)
            for name, failure in (("a", "closed"), ("b", "open"))
        ]
        a, b = (f.result() for f in starting)
    yield a, b
    a.stop()
    b.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition()` held; AssertionError after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def test_requests_per_minute_shared_by_two_gateways(gateways):
    """Eight requests at once, four to each gateway, of a key allowed 3 a minute: exactly three are served, and
    their headers count down 2, 1, 0 on one shared bucket."""
    a, b = gateways
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda g: g.post("sk-rpm3", QUICK), [a, b] * 4))
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len(served) == 3, [r.status_code for r in answers]
    assert sorted(r.headers["x-ratelimit-remaining-requests"] for r in served) == ["0", "1", "2"]
    for r in refused:
        err = error_of(r, 429)
        assert err["code"] == "rate_limit_exceeded" and "requests per minute" in err["message"]
        assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert a.metric("dsv2_key_rate_limited_total", key="rpm3") + b.metric(
        "dsv2_key_rate_limited_total", key="rpm3"
    ) == len(refused)


def test_tokens_per_minute_reserved_and_refunded_across_gateways(gateways):
    """A stream on A reserves the key's whole minute (prompt + max_tokens = 60): B refuses the key meanwhile.
    The stream uses 6 of its max_tokens; the rest comes back, and B serves the key again."""
    a, b = gateways
    prompt = a.post("sk-free", QUICK).json()["usage"]["prompt_tokens"]
    with a.held_stream("sk-tok", {**STREAM, "max_tokens": 60 - prompt}) as read_to_end:
        reserved_at = time.monotonic()
        refused = b.post("sk-tok", QUICK)
        err = error_of(refused, 429)
        assert "tokens per minute" in err["message"] and "of 60 left" in err["message"], err
        assert int(b.models("sk-tok").headers["x-ratelimit-remaining-tokens"]) <= 2 + (
            time.monotonic() - reserved_at
        )  # 1 token a second
        read_to_end()
    used = prompt + 6
    left = int(until_settled(b, "sk-tok", 60 - used, reserved_at))
    assert left >= 60 - used  # without the refund: 60 - prompt - (60 - prompt) = 0, plus the refill
    served = b.post("sk-tok", QUICK)
    assert served.status_code == 200, served.text
    remaining = int(served.headers["x-ratelimit-remaining-tokens"])
    expected = 60 - used - (prompt + 1)
    assert expected <= remaining <= expected + 2 + (time.monotonic() - reserved_at)


def until_settled(g: Gateway, key: str, at_least: int, since: float) -> int:
    """The key's remaining tokens, once the refund shows (it is settled as the stream's slot closes)."""
    seen = []

    def settled() -> bool:
        seen.append(int(g.models(key).headers["x-ratelimit-remaining-tokens"]))
        return seen[-1] >= at_least

    until(settled, 5)
    assert seen[-1] <= at_least + 2 + (time.monotonic() - since)  # the refill: 1 token a second
    return seen[-1]


def test_max_sequences_across_gateways(gateways):
    """A stream of a key with max_sequences 1 held on A: B refuses the key's next one; once it ends, B admits."""
    a, b = gateways
    with a.held_stream("sk-seq", STREAM) as read_to_end:
        err = error_of(b.post("sk-seq", QUICK), 429)
        assert "sequences in flight" in err["message"] and "'seq' has 1 of its 1" in err["message"], err
        read_to_end()
    until(lambda: b.post("sk-seq", QUICK).status_code == 200, 5)


def test_sequences_of_a_killed_gateway_come_back_after_the_lease(
    redis_server, gateways, tiny_lite_dir, workdir
):
    """A gateway SIGKILLed while it holds the key's only sequence: its lease is no longer renewed, and the key's
    sequence is free again once it lapses (within --rate-limit-lease-seconds), without anyone releasing it."""
    _, b = gateways
    c = start_gateway(tiny_lite_dir, workdir, "c", redis_server.url, "open")
    try:
        with suppress(httpx.HTTPError), c.held_stream("sk-lease", STREAM):
            c.kill()
        killed_at = time.monotonic()
        err = error_of(b.post("sk-lease", QUICK), 429)  # C's lease still counts
        assert "sequences in flight" in err["message"]
        with redis_server.client() as r:
            assert r.zcard("dsv2:ratelimit:{lease}:sequences") == 1
        until(lambda: b.post("sk-lease", QUICK).status_code == 200, LEASE_S + 3)
        assert time.monotonic() - killed_at >= LEASE_S / 3  # not before the lease lapsed, renewed or not
    finally:
        c.stop()


def test_headers_read_the_shared_state(gateways):
    """A request on A and one on B count in one bucket; A's headers for a request that takes nothing (GET
    /v1/models) read what B left."""
    a, b = gateways
    start = time.monotonic()
    first = a.post("sk-heads", QUICK)
    prompt = first.json()["usage"]["prompt_tokens"]
    assert first.headers["x-ratelimit-limit-requests"] == "10"
    assert first.headers["x-ratelimit-remaining-requests"] == "9"
    assert first.headers["x-ratelimit-limit-tokens"] == "600"
    second = b.post("sk-heads", QUICK)
    assert second.headers["x-ratelimit-remaining-requests"] == "8"
    looked = a.models("sk-heads").headers
    assert looked["x-ratelimit-remaining-requests"] == "8"
    assert looked["x-ratelimit-reset-requests"].endswith("s")
    used = 2 * (prompt + 1)  # each charged its prompt and one token, nothing left to refund
    refill = 10 * (time.monotonic() - start) + 1  # 10 tokens a second
    for headers in (second.headers, looked):
        assert 600 - used <= int(headers["x-ratelimit-remaining-tokens"]) <= 600 - used + refill


class Commands:
    """What the gateways ask Redis about one key, read from Redis's own slow log (every command logged): the
    scripts (EVALSHA: "take" by its SHA, else "script") and the release (ZREM); the commands the scripts run
    inside are logged too, and left out."""

    def __init__(self, redis_server: RedisServer, name: str) -> None:
        import hashlib

        from server.gateway.ratelimit_store import TAKE

        self.redis_server, self.tag = redis_server, f"{{{name}}}".encode()
        self.take_sha = hashlib.sha1(TAKE.encode()).hexdigest().encode()
        with redis_server.client() as r:
            r.script_load(TAKE)  # as it is after the first call: a fresh Redis answers NOSCRIPT once
            r.config_set("slowlog-log-slower-than", 0)
            r.config_set("slowlog-max-len", 100_000)
            r.slowlog_reset()

    def __call__(self) -> list[str]:
        with self.redis_server.client() as r:
            entries = sorted(r.slowlog_get(100_000), key=lambda e: e["id"])
        seen = []
        for entry in entries:
            args = entry["command"].split(b" ")
            if not any(self.tag in arg for arg in args):
                continue
            name = args[0].decode().lower()
            if name not in ("evalsha", "zrem"):
                continue
            seen.append("take" if name == "evalsha" and args[1] == self.take_sha else
                        "script" if name == "evalsha" else name)  # fmt: skip
        return seen


def test_one_round_trip_per_admission_and_none_for_a_spent_key(redis_server, gateways):
    """A request of a key with all three limits asks Redis once to be admitted (its request, its tokens and its
    sequences in one script) and once at its end (its sequences released); a key found spent is refused before
    its body by the process that found it, without asking; a request that ends before its check still counts."""
    a, b = gateways
    commands = Commands(redis_server, "all")
    served = a.post("sk-all", QUICK)
    assert served.status_code == 200, served.text
    assert served.headers["x-ratelimit-remaining-requests"] == "1"
    until(lambda: "zrem" in commands(), 5)  # released in a task of its own, after the response
    assert [c for c in commands() if c != "script"] == ["take", "zrem"]  # renewals aside
    assert b.post("sk-all", QUICK).headers["x-ratelimit-remaining-requests"] == "0"  # B found it spent
    before = len(commands())
    refused = [b.post("sk-all", QUICK), b.post("sk-all", {"model": MODEL, "messages": "not a list"})]
    for r in refused:
        err = error_of(r, 429)
        assert "requests per minute" in err["message"] and r.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(r.headers["retry-after"]) <= 30
    assert len(commands()) == before  # B did not ask
    error_of(a.post("sk-all", QUICK), 429)  # A asks once, and learns
    assert commands()[before:].count("take") == 1
    error_of(a.post("sk-all", QUICK), 429)
    assert commands()[before:].count("take") == 1

    # A request refused before its check (a bad body) is one of the key's requests: one take, at its response.
    bad = Commands(redis_server, "bad")
    err = error_of(a.post("sk-bad", {**QUICK, "temperature": 9}), 400)
    assert err["param"] == "temperature"
    assert bad() == ["take"]
    assert a.post("sk-bad", QUICK).headers["x-ratelimit-remaining-requests"] == "3"


def test_store_down_closed_refuses_open_admits_and_both_recover(redis_server, gateways):
    """Redis killed: A (closed) refuses the limited key with an OpenAI-shaped 503 naming the store, B (open)
    serves it uncounted; keys without limits and readiness are untouched; both count the errors and log them
    once. Redis started again on the same port: limits are enforced again with no gateway restarted."""
    a, b = gateways
    logged = len(b.log.read_text())
    redis_server.kill()
    refused = a.post("sk-down", QUICK)
    err = error_of(refused, 503)
    assert err["code"] == "rate_limit_store_unavailable" and err["type"] == "server_error"
    assert redis_server.url in err["message"] and int(refused.headers["retry-after"]) >= 1
    assert a.post("sk-free", QUICK).status_code == 200  # no limits: no store
    assert [b.post("sk-down", QUICK).status_code for _ in range(4)] == [200] * 4  # 4 > 3: uncounted
    assert httpx.get(f"{a.url}/ready", timeout=10).status_code == 200
    for g in (a, b):
        assert g.metric("dsv2_rate_limit_store_errors_total") >= 1
        assert g.metric("dsv2_rate_limit_store_up", store=redis_server.url) == 0
    assert a.metric("dsv2_rejected_requests_total", reason="rate_limit_store") >= 1
    assert b.log.read_text()[logged:].count("rate-limit store") == 1  # one warning for all the failures

    redis_server.start()  # empty: a fresh minute for every key
    until(lambda: a.post("sk-down", QUICK).status_code == 200, 5)  # one of the 3
    assert [b.post("sk-down", QUICK).status_code, a.post("sk-down", QUICK).status_code] == [200, 200]
    assert error_of(b.post("sk-down", QUICK), 429)["code"] == "rate_limit_exceeded"
    for g in (a, b):
        assert g.metric("dsv2_rate_limit_store_up", store=redis_server.url) == 1
        assert "is reachable again" in g.log.read_text()


if __name__ == "__main__":
    serve_fake_engine(json.loads(sys.argv[1]))
