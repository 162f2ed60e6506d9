"""The Batch API's HTTP rules over FakeEngine (HTTP unit tests only; the real engine: tests/test_batch.py): per-key
caps, the upload limit, batch lines at --batch-priority and under the batch cap, outside the key's rate limits
unless --batch-counts-toward-limits, and a batch line's identity that no client can forge.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.gateway.app import create_app
from server.settings import Settings
from tests.fake_engine import FakeEngine

MODEL = "tiny"
A = {"Authorization": "Bearer sk-a"}
B = {"Authorization": "Bearer sk-b"}


def make_client(model_dir: Path, batch_dir: Path, engine: FakeEngine | None = None, **settings) -> TestClient:
    s = Settings(
        model=str(model_dir),
        served_model_name=[MODEL],
        api_keys=["sk-a", "sk-b"],
        batch_dir=str(batch_dir),
        batch_poll_seconds=0.05,
        **settings,
    )
    return TestClient(create_app(s, engine=engine or FakeEngine()), raise_server_exceptions=False)


def jsonl(n: int, **body) -> bytes:
    line = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    return "".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": line})
        + "\n"
        for i in range(n)
    ).encode()


def upload(c: TestClient, data: bytes, headers=A):
    return c.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}, headers=headers)


def run_batch(c: TestClient, data: bytes, headers=A) -> dict:
    file_id = upload(c, data, headers).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = c.post("/v1/batches", json=body, headers=headers).json()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        batch = c.get(f"/v1/batches/{batch['id']}", headers=headers).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.05)
    raise AssertionError(batch)


def metric(c: TestClient, line_start: str) -> float:
    return sum(
        float(x.rsplit(" ", 1)[1]) for x in c.get("/metrics").text.splitlines() if x.startswith(line_start)
    )


def test_per_key_caps_and_upload_limit(tiny_lite_dir: Path, tmp_path: Path) -> None:
    with make_client(
        tiny_lite_dir,
        tmp_path,
        batch_max_stored_bytes=2000,
        batch_max_open_batches=1,
        batch_max_file_bytes=2048,
    ) as c:
        assert upload(c, b"x" * 3000).status_code == 413  # over --batch-max-file-bytes
        assert upload(c, jsonl(5)).status_code == 200
        r = upload(c, jsonl(8))  # the key's files would pass 2000 bytes
        assert r.status_code == 400 and r.json()["error"]["code"] == "storage_limit_exceeded"
        assert upload(c, jsonl(8), B).status_code == 200  # another key's own allowance
        assert (
            c.post(
                "/v1/files", files={"file": ("x", b"{}")}, data={"purpose": "fine-tune"}, headers=A
            ).status_code
            == 400
        )
        # One open batch per key: a second while the first is unfinished is a 429 (the worker may be quick, so
        # the first is made to wait: its lines hold the engine).
        c.app.state.batches.admission.draining = True
        file_id = c.get("/v1/files", headers=A).json()["data"][0]["id"]
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        assert c.post("/v1/batches", json=body, headers=A).status_code == 200
        r = c.post("/v1/batches", json=body, headers=A)
        assert r.status_code == 429, r.text
        c.app.state.batches.admission.draining = False


def test_batch_lines_run_at_batch_priority_outside_rate_limits(tiny_lite_dir: Path, tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.priority_scheduling = True
    with make_client(tiny_lite_dir, tmp_path, engine, batch_priority=77) as c:
        done = run_batch(c, jsonl(3))
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
        assert [o.priority for o in engine.options] == [77, 77, 77]
        c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            headers=A,
        )
        assert engine.options[-1].priority == 0  # live requests keep theirs
        assert metric(c, 'dsv2_key_requests_total{key="key-1"}') == 4  # batch lines are the key's usage
        assert metric(c, 'dsv2_batch_requests_total{status="completed"}') == 3
        # Their tokens count; the latency histograms (the TTFT alert's) hold the live request alone.
        assert metric(c, 'dsv2_generation_tokens_total{route="/v1/chat/completions"}') > 0
        assert metric(c, 'dsv2_time_to_first_token_seconds_count{route="/v1/chat/completions"}') == 1
        assert metric(c, 'dsv2_e2e_request_latency_seconds_count{route="/v1/chat/completions"}') == 1


def test_batch_tokens_count_toward_limits_only_with_the_flag(tiny_lite_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    # 300 tokens a minute refill 5 a second: the 2 lines' ~26 tokens show for seconds, on a loaded machine too.
    keys.write_text("metered:\n  key: sk-m\n  tokens_per_minute: 300\n  requests_per_minute: 3\n")
    m = {"Authorization": "Bearer sk-m"}
    live = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    remaining = {}
    for counts in (False, True):
        s = {"api_key_file": str(keys), "batch_counts_toward_limits": counts}
        with make_client(tiny_lite_dir, tmp_path / str(counts), **s) as c:
            if not counts:  # more lines than the key's requests per minute: none waits for it
                assert run_batch(c, jsonl(6), m)["request_counts"]["completed"] == 6
            else:
                assert run_batch(c, jsonl(2), m)["request_counts"]["completed"] == 2
            r = c.post("/v1/chat/completions", json=live, headers=m)
            assert r.status_code == 200, r.text
            remaining[counts] = (
                int(r.headers["x-ratelimit-remaining-tokens"]),
                int(r.headers["x-ratelimit-remaining-requests"]),
            )
    assert (
        remaining[False][1] == 2 and remaining[True][1] == 0
    )  # 3 per minute: the live one alone, or after 2
    assert remaining[True][0] < remaining[False][0] - 10  # the batch's tokens were charged too


def test_batch_identity_cannot_be_forged(tiny_lite_dir: Path, tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.priority_scheduling = True
    with make_client(tiny_lite_dir, tmp_path, engine) as c:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        for forged in (
            {"x-dsv2-batch-owner": "key-1"},
            {"x-dsv2-batch-secret": "guess", "x-dsv2-batch-owner": "key-1"},
        ):
            assert c.post("/v1/chat/completions", json=chat, headers=forged).status_code == 401
            assert c.post("/v1/chat/completions", json=chat, headers={**B, **forged}).status_code == 200
            assert engine.options[-1].priority == 0  # a live request of key-2, not a batch line of key-1


@pytest.mark.parametrize("window", ["1h", "48h"])
def test_only_the_24h_window(tiny_lite_dir: Path, tmp_path: Path, window: str) -> None:
    with make_client(tiny_lite_dir, tmp_path) as c:
        file_id = upload(c, jsonl(1)).json()["id"]
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window}
        r = c.post("/v1/batches", json=body, headers=A)
        assert r.status_code == 400 and r.json()["error"]["param"] == "completion_window"


async def test_batch_cap_is_spare_capacity() -> None:
    """Batch lines take --batch-max-sequences while no live request runs, --batch-busy-max-sequences while one does,
    all inside the server's budget."""
    from contextlib import AsyncExitStack

    from server.gateway.admission import Admission
    from server.gateway.errors import APIError
    from server.gateway.metrics import GatewayMetrics

    admission = Admission(FakeEngine(), GatewayMetrics(), 10, batch_budget=4, batch_busy_budget=1)
    async with AsyncExitStack() as stack:
        live = AsyncExitStack()
        await live.enter_async_context(admission.slot(1, "live"))
        await stack.enter_async_context(admission.slot(1, "b0", batch=True))
        with pytest.raises(APIError) as refused:
            await stack.enter_async_context(admission.slot(1, "b1", batch=True))
        assert refused.value.status == 429
        await live.aclose()  # live load drops: the batch takes the spare capacity
        for i in range(1, 4):
            await stack.enter_async_context(admission.slot(1, f"b{i}", batch=True))
        with pytest.raises(APIError):
            await stack.enter_async_context(admission.slot(1, "b4", batch=True))
        assert admission.batch_sequences == 4
        for i in range(6):  # live requests are never held back by batch lines, only by the budget
            await stack.enter_async_context(admission.slot(1, f"live{i}"))
        assert admission.sequences == 10
    assert admission.sequences == admission.batch_sequences == 0


async def test_a_busy_cap_of_zero_starts_no_batch_line_beside_live_ones() -> None:
    from contextlib import AsyncExitStack

    from server.gateway.admission import Admission
    from server.gateway.errors import APIError
    from server.gateway.metrics import GatewayMetrics

    admission = Admission(FakeEngine(), GatewayMetrics(), 10, batch_budget=2, batch_busy_budget=0)
    async with AsyncExitStack() as stack:
        running = AsyncExitStack()
        await running.enter_async_context(admission.slot(1, "b0", batch=True))  # running when live load comes
        live = AsyncExitStack()
        await live.enter_async_context(admission.slot(1, "live"))
        assert admission.batch_cap == 0
        with pytest.raises(APIError) as refused:
            await stack.enter_async_context(admission.slot(1, "b1", batch=True))
        assert refused.value.status == 429
        await running.aclose()  # the running line finished; still none may start beside the live request
        with pytest.raises(APIError):
            await stack.enter_async_context(admission.slot(1, "b1", batch=True))
        await live.aclose()
        await stack.enter_async_context(admission.slot(1, "b1", batch=True))
        await stack.enter_async_context(admission.slot(1, "b2", batch=True))
        assert admission.batch_sequences == 2
