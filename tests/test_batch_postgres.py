"""The Batch API's store on a real PostgreSQL (Debian's `postgresql` package, scripts/install-postgresql.sh): the
migrations and the lease, then two replicas on one database sharing the batches, one killed mid-batch and the other
taking its batch over, with every custom_id exactly once.

The test setup starts its own server (initdb + postgres in a temporary directory, on a free port, as the
`postgres` user when run as root) and stops it at the end.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ports
from tests.test_batch import (
    FINAL,
    KEY_A,
    batch_flags,
    chat_line,
    create,
    result_lines,
    upload,
    wait_for_batch,
)
from tests.test_gateway_engine import Server, metric, start_server

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))


class Postgres:
    def __init__(self) -> None:
        if not BIN or not (Path(BIN[-1]) / "initdb").exists():
            pytest.skip(
                "PostgreSQL not installed: scripts/install-postgresql.sh could not install Debian's postgresql"
            )
        self.bin = Path(BIN[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="dsv2-pg-"))
        self.data = self.dir / "data"
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "dsv2", "--auth=trust", "-E", "UTF8")
        self.port = ports.free_port()
        self.proc = subprocess.Popen(
            [
                *self.user,
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"postgresql://dsv2@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True).returncode == 0:  # fmt: skip
                return
            time.sleep(0.3)
        raise RuntimeError("postgres did not start")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.user, str(self.bin / tool), *args], check=True, capture_output=True)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    yield pg
    pg.stop()


def test_migrations_and_leases_on_postgresql(postgres: Postgres, tmp_path: Path) -> None:
    import sqlalchemy as sa

    from server.batch.store import Store, database_url

    store = Store(database_url(postgres.url, tmp_path), tmp_path / "files")
    store.migrate()
    store.migrate()  # at head already: nothing to do
    with store.db.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0001"
    f = store.add_file("k", "in.jsonl", "batch", b"{}\n")
    batch = store.add_batch("k", "/v1/chat/completions", f["id"], 86400, None, 1, None)
    assert store.claim("r1", 0.5)["id"] == batch["id"]
    assert store.claim("r2", 0.5) is None  # leased
    assert store.record(batch["id"], 0, "a", True, {"x": 1}) and not store.record(
        batch["id"], 0, "a", True, {}
    )
    time.sleep(0.6)
    assert store.claim("r2", 5)["id"] == batch["id"]  # the lease lapsed: r2 takes over
    assert store.renew(batch["id"], "r1", 5) is None  # and r1 knows it lost it
    store.advance(batch["id"], "r2", "cancelled")
    store.close()


@pytest.mark.engine
def test_two_replicas_share_batches_without_duplicates(
    postgres: Postgres, tiny_lite_dir: Path, tmp_path: Path
) -> None:
    """Two servers on one PostgreSQL (and one file directory, as a ReadWriteMany volume): each batch is worked by
    one replica at a time; both work; one SIGKILLed mid-batch, the other finishes its batch once the lease lapses."""
    flags = batch_flags(tmp_path / "shared", "--batch-store", postgres.url)
    servers: list[Server] = []

    def start(i: int) -> None:
        servers.append(start_server(tiny_lite_dir, tmp_path / f"replica-{i}.log", *flags))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(servers) == 2
    a, b = servers
    import openai

    oai = openai.OpenAI(base_url=f"{a.url}/v1", api_key=KEY_A, max_retries=0, timeout=120)
    n, count = 16, 4
    ids = []
    for j in range(count):
        lines = [chat_line(f"b{j}-{i}", max_tokens=24, ignore_eos=True) for i in range(n)]
        ids.append(create(oai, upload(oai, lines)).id)
    try:
        # Both replicas take a batch each; then A dies mid-batch.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metric(a, "dsv2_batch_requests_total") >= 2 and metric(b, "dsv2_batch_requests_total") >= 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the two replicas did not both work")
        a.crash()
        oai_b = openai.OpenAI(base_url=f"{b.url}/v1", api_key=KEY_A, max_retries=0, timeout=120)
        for j, batch_id in enumerate(ids):
            done = wait_for_batch(oai_b, batch_id, timeout=240)
            assert done.status == "completed" and done.request_counts.completed == n, done
            got = Counter(x["custom_id"] for x in result_lines(oai_b, done.output_file_id))
            assert got == Counter(f"b{j}-{i}" for i in range(n))
        assert all(oai_b.batches.retrieve(i).status in FINAL for i in ids)
    finally:
        for srv in servers:
            srv.stop()
