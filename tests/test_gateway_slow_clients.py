"""Slow clients against a real uvicorn server (the gateway's own config and protocol, connections.py) over
FakeEngine: a stream whose client never reads, a finished stream whose client has not read it yet, slowloris
headers, a slow body, the connection cap. Raw sockets play the clients that no HTTP library would be.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from server.gateway import connections, render
from server.gateway.app import create_app
from server.settings import Settings
from tests.fake_engine import FakeEngine
from tests.ports import free_port

MODEL = "tiny"
LONG_WORD = "w" * 2000


class Live:
    """The app served by uvicorn in a thread of its own, as `run()` serves it."""

    def __init__(self, app, engine: FakeEngine, port: int) -> None:
        self.app, self.engine, self.port = app, engine, port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def sequences(self) -> int:
        return self.app.state.admission.sequences

    def metric(self, series: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == series:
                return float(value)
        return 0.0


@contextmanager
def live(model_dir, engine: FakeEngine, **settings) -> Iterator[Live]:
    port = free_port()
    s = Settings(model=str(model_dir), served_model_name=MODEL, port=port, **settings)
    app = create_app(s, engine=engine)
    server = uvicorn.Server(connections.config(app, s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30)
    try:
        yield Live(app, engine, port)
    finally:
        server.should_exit = True
        thread.join(30)


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> float:
    """Seconds until `condition()` held; AssertionError after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
    return time.monotonic() - start


def raw_client(srv: Live, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connecting: the window the server sees
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", srv.port))
    return sock


def post_bytes(path: str, body: dict, content_length: int | None = None) -> bytes:
    data = json.dumps({"model": MODEL, **body}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data) if content_length is None else content_length}\r\n\r\n"
    )
    return head.encode() + data


def read_all(sock: socket.socket, timeout: float = 30) -> bytes:
    """Everything until the server closes the connection (a reset counts as closed)."""
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


class Probes:
    """GET /health and /ready every 0.1 s from a thread; every answer must be a 200."""

    def __init__(self, srv: Live) -> None:
        self.srv, self.results, self._stop = srv, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.srv.url, timeout=5) as client:
            while not self._stop.is_set():
                for path in ("/health", "/ready"):
                    r = client.get(path)
                    self.results.append((path, r.status_code, r.text))
                self._stop.wait(0.1)

    def __enter__(self) -> Probes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert self.results and all(status == 200 for _, status, _ in self.results), [
            r for r in self.results if r[1] != 200
        ][:5]


BIG_STREAM = {
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "n": 4,
    "max_tokens": 2000,
}  # 4 x 2000 chunks of ~2 KB: 16 MB, more than any socket holds


def test_never_read_stream_is_dropped_and_frees_its_slot(tiny_lite_dir, monkeypatch):
    monkeypatch.setattr(render, "OUTBOX_BYTES", 64 * 1024)
    engine = FakeEngine(max_model_len=4096, words=[LONG_WORD] * 2000)
    settings = {"stream_send_timeout": 1.5, "liveness_stall_seconds": 0.5, "readiness_window_seconds": 0.5}
    with live(tiny_lite_dir, engine, **settings) as srv, Probes(srv):
        sock = raw_client(srv, rcvbuf=4096)
        start = time.monotonic()
        sock.sendall(post_bytes("/v1/chat/completions", BIG_STREAM))
        wait_for(lambda: srv.sequences == 4)
        time.sleep(1.0)  # the engine waits for the stream, and the stream for the client: no probe fails
        assert srv.sequences == 4 and not engine.aborted
        wait_for(lambda: srv.sequences == 0)
        assert time.monotonic() - start >= 1.5
        assert len(engine.aborted) == 1 and not engine.running
        received = read_all(sock)  # the server dropped the connection, cut short
        assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received
        assert len(received) < 16_000_000
        sock.close()
        assert srv.metric('dsv2_aborted_requests_total{reason="slow_client"}') == 1
        assert srv.metric("dsv2_sequences_in_flight") == 0
        # the budget is whole again: a request of the same size is served
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, **BIG_STREAM, "max_tokens": 5})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_finished_stream_frees_its_slot_before_the_client_reads(tiny_lite_dir, monkeypatch):
    monkeypatch.setattr(render, "OUTBOX_BYTES", 64 * 1024 * 1024)
    engine = FakeEngine(max_model_len=4096, words=[LONG_WORD] * 1000)
    body = {**BIG_STREAM, "n": 8, "max_tokens": 1000}  # 16 MB
    with live(tiny_lite_dir, engine, stream_send_timeout=30) as srv:
        sock = raw_client(srv, rcvbuf=4096)
        sock.sendall(post_bytes("/v1/chat/completions", body))
        wait_for(lambda: engine.generated)
        wait_for(lambda: srv.sequences == 0 and not engine.running)  # rendered: the slot is free, unread
        assert not engine.aborted
        assert srv.metric("dsv2_generation_requests_in_flight") == 0
        received = _read_response(sock)
        sock.close()
    assert len(received) > 16_000_000 and received.endswith(b"data: [DONE]\n\n")


def _read_response(sock: socket.socket) -> bytes:
    """A chunked response's body, up to its last chunk."""
    return b"".join(_read_chunks(sock))


def _read_chunks(sock: socket.socket) -> list[bytes]:
    """A chunked 200 response's chunks, up to its last one, each framed strictly: its size line, exactly that many
    bytes, CRLF."""
    sock.settimeout(30)
    out = bytearray()
    while not out.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(1 << 16)
        assert chunk, "the server closed the connection early"
        out += chunk
    head, _, rest = bytes(out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            assert rest == b"\r\n"
            return chunks
        assert rest[size : size + 2] == b"\r\n"
        chunks.append(rest[:size])
        rest = rest[size + 2 :]


def test_events_written_straight_to_the_connection_are_framed_and_in_order(tiny_lite_dir, monkeypatch):
    """While the client keeps up, a stream's events go to the transport without the ASGI send (connections.WRITE):
    one valid chunk each, in order, every byte of every event, text of any kind included."""
    written: list[bytes] = []
    write = connections.GatewayProtocol._write

    def spy(self, cycle, body: bytes) -> bool:
        taken = write(self, cycle, body)
        if taken:
            written.append(body)
        return taken

    monkeypatch.setattr(connections.GatewayProtocol, "_write", spy)
    words = ["H\u00e9llo", ' "quoted"', " back\\slash", " \u2028line\nbreak", " \x01\x1f", " \U0001f642", "."]
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 50}
    with live(tiny_lite_dir, FakeEngine(words=words, delay=0.02)) as srv:  # steps apart, as an engine's
        sock = raw_client(srv)
        sock.sendall(post_bytes("/v1/chat/completions", body))
        chunks = _read_chunks(sock)
        sock.close()
    assert written and all(w in chunks for w in written)
    events = b"".join(chunks).decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    deltas = [json.loads(e.removeprefix("data: "))["choices"][0]["delta"] for e in events[:-2]]
    assert "".join(d.get("content", "") for d in deltas) == "".join(words)


def test_slowloris_headers_are_cut_off_while_others_are_served(tiny_lite_dir):
    with live(tiny_lite_dir, FakeEngine(), header_timeout=1.0) as srv:
        sock = raw_client(srv)
        start = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Ty")
        idle = raw_client(srv)  # no byte yet: idle, kept until the keep-alive timeout
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=chat).status_code == 200
        assert httpx.get(f"{srv.url}/health").status_code == 200
        received = read_all(sock, timeout=10)
        elapsed = time.monotonic() - start
        assert 1.0 <= elapsed < 5, elapsed
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        idle.settimeout(0.5)
        with pytest.raises(TimeoutError):
            idle.recv(1)
        sock.close()
        idle.close()


def test_oversized_headers_get_431_and_the_connection_closed(tiny_lite_dir):
    from server.gateway.connections import MAX_HEADER_BYTES

    with live(tiny_lite_dir, FakeEngine()) as srv:
        sock = raw_client(srv)
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        try:  # the server may close while headers are still being sent: what it answered is read below
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n" + filler * (MAX_HEADER_BYTES // 1000 + 8))
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = read_all(sock, timeout=10)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431"), head
        assert json.loads(body)["error"]["code"] == "request_headers_too_large"
        sock.close()
        # just under the cap is a request like any other
        ok = raw_client(srv)
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n" + filler * (MAX_HEADER_BYTES // 1100) + b"\r\n")
        ok.settimeout(10)
        assert ok.recv(64).startswith(b"HTTP/1.1 200")
        ok.close()


def test_slow_body_gets_408(tiny_lite_dir):
    with live(tiny_lite_dir, FakeEngine(), body_timeout=1.0) as srv:
        sock = raw_client(srv)
        whole = post_bytes("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        start = time.monotonic()
        sock.sendall(whole[:-10])  # the headers and most of the body; the rest never comes
        received = read_all(sock, timeout=10)
        assert 1.0 <= time.monotonic() - start < 5
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert "1 s" in error["message"] and error["type"] == "invalid_request_error"
        sock.close()
        # a body that arrives in pieces, in time, is read
        sock = raw_client(srv)
        sock.sendall(whole[:-10])
        time.sleep(0.3)
        sock.sendall(whole[-10:])
        sock.settimeout(10)
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 200")
        sock.close()


def test_connection_cap_answers_probes_and_refuses_the_rest(tiny_lite_dir):
    with live(tiny_lite_dir, FakeEngine(), max_connections=3) as srv:
        held = [raw_client(srv) for _ in range(3)]
        wait_for(lambda: len(srv.app.state.admission.slots) == 0)
        time.sleep(0.2)  # the server has accepted them
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{srv.url}{path}").status_code == 200, path
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=chat)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "too_many_connections"
        for sock in held:
            sock.close()
        wait_for(lambda: httpx.post(f"{srv.url}/v1/chat/completions", json=chat).status_code == 200)


def test_a_client_that_leaves_mid_stream_aborts_it_cleanly(tiny_lite_dir, caplog):
    engine = FakeEngine(max_model_len=4096, delay=0.05, words=["w"] * 200)
    with live(tiny_lite_dir, engine) as srv:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 200,
        }
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        # The slot is released at once, the engine's abort sent by a task of its own just after.
        wait_for(lambda: srv.sequences == 0 and engine.aborted)
        assert len(engine.aborted) == 1
        assert srv.metric('dsv2_aborted_requests_total{reason="client_disconnected"}') == 1
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records][-5:]
