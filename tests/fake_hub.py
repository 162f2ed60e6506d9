"""A stand-in for the Hugging Face Hub's HTTP API (no hub is reachable from tests): serves one local directory as
`repo@sha` to the real huggingface_hub client (HF_ENDPOINT=fake.url), slowly enough that a download can be
watched. Only what `snapshot_download` of a pinned commit asks for: the repo's tree, and each file's HEAD and
(ranged) GET on /resolve/. Any other repo or revision is a 404, as on the hub.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repo: str, sha: str, directory: Path, bytes_per_second: float) -> None:
        self.repo, self.sha, self.dir = repo, sha, directory
        self.bytes_per_second = bytes_per_second
        self.files = {
            p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()
        }
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def oid(self, name: str) -> str:
        return hashlib.sha1(self.files[name].read_bytes()).hexdigest()

    def answer(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        tree = f"/api/models/{self.repo}/tree/{self.sha}"
        resolve = f"/{self.repo}/resolve/{self.sha}/"
        if path.rstrip("/") == tree:
            entries = [
                {"type": "file", "oid": self.oid(n), "size": p.stat().st_size, "path": n}
                for n, p in self.files.items()
            ]
            return self.send(h, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)
        if path.startswith(resolve) and path[len(resolve) :] in self.files:
            name = path[len(resolve) :]
            data = self.files[name].read_bytes()
            start = 0
            if (ranged := h.headers.get("Range", "")).startswith("bytes="):
                start = int(ranged[6:].split("-")[0] or 0)
            headers = {
                "X-Repo-Commit": self.sha,
                "ETag": f'"{self.oid(name)}"',
                "Content-Type": "application/octet-stream",
            }
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self.send(h, data[start:], headers, body, status=206 if start else 200, slow=True)
        self.send(h, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body, status=404)

    def send(self, h, data: bytes, headers: dict, body: bool, status: int = 200, slow: bool = False) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        if not body:
            return
        chunk = 64 * 1024
        for i in range(0, len(data), chunk):
            h.wfile.write(data[i : i + chunk])
            if slow:
                time.sleep(len(data[i : i + chunk]) / self.bytes_per_second)
