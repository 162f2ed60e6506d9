"""The Batch API end to end with the real engine: `python -m server serve` on the tiny checkpoint with two keys, a
SQLite store in a temporary --batch-dir and the priority scheduler, driven by the official openai SDK (upload,
create, poll, download, parse). Then: another key's 404s, a malformed file, cancel and expiry mid-batch, the same
body live and in a batch for the same seed, and last a SIGTERM (drain) and a SIGKILL mid-batch, each followed by a
restart that finishes the batch with every custom_id exactly once. PostgreSQL and two replicas:
tests/test_batch_postgres.py; the HTTP rules over FakeEngine: tests/test_batch_http.py.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import openai_schema
from tests.test_gateway_engine import MODEL, Server, metric, start_server

pytestmark = pytest.mark.engine

KEY_A, KEY_B = "sk-batch-a", "sk-batch-b"
FINAL = ("completed", "failed", "expired", "cancelled")


def batch_flags(batch_dir: Path, *more: str) -> tuple[str, ...]:
    return (
        "--api-keys",
        f"{KEY_A},{KEY_B}",
        "--batch-dir",
        str(batch_dir),
        "--batch-poll-seconds",
        "0.2",
        "--batch-lease-seconds",
        "3",
        "--batch-max-sequences",
        "4",
        "--scheduling-policy",
        "priority",
        *more,
    )


class Running:
    """The module's server, which the last tests stop or kill and start again on the same --batch-dir."""

    def __init__(self, model_dir: Path, log_dir: Path, batch_dir: Path) -> None:
        self.model_dir, self.log_dir, self.batch_dir = model_dir, log_dir, batch_dir
        self.starts = 0
        self.server = self.start()

    def start(self) -> Server:
        self.starts += 1
        log = self.log_dir / f"server-{self.starts}.log"
        return start_server(self.model_dir, log, *batch_flags(self.batch_dir))

    def kill_and_restart(self) -> None:
        self.server.crash()
        self.server = self.start()


@pytest.fixture(scope="module")
def running(tiny_lite_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    where = tmp_path_factory.mktemp("batch")
    run = Running(tiny_lite_dir, where, where / "batches")
    yield run
    assert run.server.stop() == 0, run.server.logs()


def client(running: Running, key: str = KEY_A):
    import openai

    return openai.OpenAI(base_url=f"{running.server.url}/v1", api_key=key, max_retries=0, timeout=120)


def chat_line(custom_id: str, content: str = "Hello!", **body) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(oai, lines: list[dict] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = oai.files.create(file=("input.jsonl", data), purpose="batch")
    spec_check("OpenAIFile", f.to_dict())
    return f.id


def create(oai, file_id: str, **kwargs):
    b = oai.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **kwargs
    )
    spec_check("Batch", b.to_dict())
    return b


def wait_for_batch(oai, batch_id: str, until=lambda b: b.status in FINAL, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = oai.batches.retrieve(batch_id)
        if until(b):
            spec_check("Batch", b.to_dict())
            return b
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {b.status} ({b.request_counts}) after {timeout} s")


def result_lines(oai, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def spec_check(name: str, body: dict) -> None:
    if openai_schema.available():
        openai_schema.validate(name, body)


def set_expiry(running: Running, batch_id: str, when: float) -> None:
    """Move a batch's 24 h window to end at `when` (the one thing a test cannot wait for)."""
    with sqlite3.connect(running.batch_dir / "batches.db", timeout=30) as db:
        db.execute("UPDATE batches SET expires_at = ? WHERE id = ?", (int(when), batch_id))


# --- tests ----------------------------------------------------------------------------------------------------


def test_sdk_upload_create_poll_download(running: Running) -> None:
    oai = client(running)
    lines = [chat_line(f"req-{i}", f"Count to {i}") for i in range(6)]
    lines.append(chat_line("bad-model", model="no-such-model"))
    batch = create(oai, upload(oai, lines), metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.request_counts.total == 7
    done = wait_for_batch(oai, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.completed == 6 and done.request_counts.failed == 1
    assert done.metadata == {"job": "nightly"}
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    out, errors = result_lines(oai, done.output_file_id), result_lines(oai, done.error_file_id)
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(6)]
    from openai.types.chat import ChatCompletion

    for x in out:
        assert x["error"] is None and x["response"]["status_code"] == 200
        assert x["id"].startswith("batch_req_") and x["response"]["request_id"]
        ChatCompletion.model_validate(x["response"]["body"])
        spec_check(openai_schema.CHAT_COMPLETION, x["response"]["body"])
    [bad] = errors
    assert bad["custom_id"] == "bad-model" and bad["response"]["status_code"] == 404
    assert bad["response"]["body"]["error"]["code"] == "model_not_found"
    # The files: listed (input and both results), retrievable, deletable.
    ids = {f.id for f in oai.files.list()}
    assert {done.input_file_id, done.output_file_id, done.error_file_id} <= ids
    assert oai.files.retrieve(done.output_file_id).purpose == "batch_output"
    page = oai.batches.list(limit=1)
    assert page.data[0].id == batch.id and page.has_more is False
    spec_check("ListBatchesResponse", oai.batches.with_raw_response.list().http_response.json())
    spec_check("ListFilesResponse", oai.files.with_raw_response.list().http_response.json())
    deleted = oai.files.with_raw_response.delete(done.error_file_id).http_response.json()
    spec_check("DeleteFileResponse", deleted)
    assert deleted["deleted"] and done.error_file_id not in {f.id for f in oai.files.list()}
    # Batch lines are the key's usage too; the batch metrics count them.
    assert metric(running.server, "dsv2_batch_requests_total") >= 7
    assert metric(running.server, 'dsv2_key_requests_total{key="key-1"}') >= 6  # the 404 never generated


def test_batch_line_body_equals_live_request(running: Running) -> None:
    """A batch line runs through the same serving path as a live request: same seed, same body."""
    oai = client(running)
    body = {"temperature": 1.0, "seed": 1234, "max_tokens": 8, "logprobs": True, "top_logprobs": 2}
    live = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi there"}], **body
    )
    batch = create(oai, upload(oai, [chat_line("same", "Hi there", **body)]))
    done = wait_for_batch(oai, batch.id)
    [line] = result_lines(oai, done.output_file_id)
    got, expected = line["response"]["body"], live.to_dict()
    for key in ("choices", "usage", "model", "object"):
        assert got[key] == expected[key], key


def test_other_keys_see_nothing(running: Running) -> None:
    import openai

    a, b = client(running, KEY_A), client(running, KEY_B)
    file_id = upload(a, [chat_line("x")])
    batch = create(a, file_id)
    for call in (
        lambda: b.files.retrieve(file_id),
        lambda: b.files.content(file_id),
        lambda: b.files.delete(file_id),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: create(b, file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert file_id not in {f.id for f in b.files.list()}
    assert batch.id not in {x.id for x in b.batches.list()}
    wait_for_batch(a, batch.id)


def test_malformed_file_fails_naming_lines(running: Running) -> None:
    oai = client(running)
    good = json.dumps(chat_line("ok")) + "\n"
    data = (
        good
        + "{not json\n"
        + json.dumps(chat_line("ok"))
        + "\n"  # fmt: skip
        + json.dumps({**chat_line("get"), "method": "GET"})
        + "\n"
        + json.dumps({**chat_line("url"), "url": "/v1/embeddings"})
        + "\n"
        + json.dumps(chat_line("body", temperature="hot"))
        + "\n"
    ).encode()
    batch = create(oai, upload(oai, data))
    assert batch.status == "failed" and batch.failed_at
    errors = {(e.line, e.code) for e in batch.errors.data}
    assert errors == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_method"),
        (5, "mismatched_url"),
        (6, "invalid_request"),
    }
    import openai

    with pytest.raises(openai.BadRequestError):
        oai.batches.create(
            input_file_id=upload(oai, [chat_line("a")]), endpoint="/v1/embeddings", completion_window="24h"
        )


def test_cancel_mid_batch(running: Running) -> None:
    oai = client(running)
    n = 40
    lines = [chat_line(f"c{i}", max_tokens=48, ignore_eos=True) for i in range(n)]
    batch = create(oai, upload(oai, lines))
    wait_for_batch(oai, batch.id, until=lambda b: b.request_counts.completed >= 2)
    assert oai.batches.cancel(batch.id).status == "cancelling"
    done = wait_for_batch(oai, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    out = result_lines(oai, done.output_file_id)
    ids = [x["custom_id"] for x in out]
    assert len(ids) == len(set(ids)) == done.request_counts.completed
    assert 2 <= len(ids) < n


def test_expired_window(running: Running) -> None:
    oai = client(running)
    n = 40
    lines = [chat_line(f"e{i}", max_tokens=48, ignore_eos=True) for i in range(n)]
    batch = create(oai, upload(oai, lines))
    wait_for_batch(oai, batch.id, until=lambda b: b.request_counts.completed >= 2)
    set_expiry(running, batch.id, time.time() - 1)
    done = wait_for_batch(oai, batch.id)
    assert done.status == "expired" and done.expired_at
    out, errors = result_lines(oai, done.output_file_id), result_lines(oai, done.error_file_id)
    expired = [x for x in errors if x["error"] and x["error"]["code"] == "batch_expired"]
    assert expired and all(x["response"] is None for x in expired)
    ids = Counter(x["custom_id"] for x in out + errors)
    assert set(ids) == {f"e{i}" for i in range(n)} and max(ids.values()) == 1


def test_latency_benchmark_runs(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/bench_batch.py (docs/benchmarks.md) against this server, briefly: live latency alone and with a batch
    running, and the batch's progress during and after the live load (no speed is asserted)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_batch.py"
    spec = importlib.util.spec_from_file_location("bench_batch", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_batch"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    args = ["--url", running.server.url, "--model-name", MODEL, "--api-key", KEY_B, "--rounds", "1"]
    args += ["--concurrency", "2", "--live-requests", "4", "--live-max-tokens", "8"]
    assert bench.main([*args, "--batch-lines", "30", "--batch-max-tokens", "16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| alone |", "| with a batch running |"))]
    assert len(rows) == 2 and all(row.endswith("| 0 |") for row in rows), out  # no live request failed
    during, after = re.search(r"during the live load: (\d+); in the same time after it: (\d+)", out).groups()
    assert int(during) + int(after) > 0, out


def test_sigterm_mid_batch_checkpoints_then_restart_resumes(running: Running) -> None:
    """SIGTERM drains: the lines running finish and are recorded, none starts, the lease is given back; the
    restarted server finishes the batch with every custom_id once."""
    n = 40
    oai = client(running)
    lines = [chat_line(f"t{i}", max_tokens=32, ignore_eos=True) for i in range(n)]
    batch = create(oai, upload(oai, lines))
    wait_for_batch(oai, batch.id, until=lambda b: b.request_counts.completed >= 3)
    code = running.server.stop()
    assert code == 0, running.server.logs()
    with sqlite3.connect(running.batch_dir / "batches.db", timeout=30) as db:
        status, done, leased = db.execute(
            "SELECT status, completed, leased_by FROM batches WHERE id = ?", (batch.id,)
        ).fetchone()
        rows = db.execute("SELECT count(*) FROM batch_results WHERE batch_id = ?", (batch.id,)).fetchone()[0]
    assert status == "in_progress" and leased is None and rows == done and 3 <= done < n
    running.server = running.start()
    oai = client(running)
    done = wait_for_batch(oai, batch.id)
    assert done.status == "completed" and done.request_counts.completed == n, done
    ids = Counter(x["custom_id"] for x in result_lines(oai, done.output_file_id))
    assert ids == Counter(f"t{i}" for i in range(n))


def test_sigkill_mid_batch_then_restart_resumes(running: Running) -> None:
    """SIGKILL mid-batch; the restarted server takes the batch over once the lease lapses and finishes it: every
    custom_id exactly once, none lost, none duplicated."""
    n = 30
    oai = client(running)
    lines = [chat_line(f"k{i}", max_tokens=32, ignore_eos=True) for i in range(n)]
    batch = create(oai, upload(oai, lines))
    wait_for_batch(oai, batch.id, until=lambda b: b.request_counts.completed >= 3)
    running.kill_and_restart()
    oai = client(running)
    done = wait_for_batch(oai, batch.id)
    assert done.status == "completed" and done.request_counts.completed == n, done
    ids = Counter(x["custom_id"] for x in result_lines(oai, done.output_file_id))
    assert ids == Counter(f"k{i}" for i in range(n))
