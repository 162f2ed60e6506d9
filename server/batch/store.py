"""Where batches live: their metadata in a database, file bytes in a directory.

The database is SQLite (`<--batch-dir>/batches.db`) for one replica, or PostgreSQL (`--batch-store
postgresql://...`) for several; its schema is Alembic's migrations (server/batch/migrations), run at start-up.
A replica works a batch only while it holds the batch's lease (`leased_by`, `lease_until`), taken and renewed by
conditional UPDATEs, so two replicas never run the same batch; one that stops renewing (killed) loses it to
another once the lease lapses.

A batch line is done when its row is in `batch_results`: the row (holding the output or error line) and the
batch's counts are written in one transaction, and a second write of the same line is ignored, so a replica that
dies anywhere leaves each line either done once or to be run again. Output files are built from these rows at
the end, in input order.

Every method is blocking (call it with asyncio.to_thread); the methods a key reaches take its `owner` name and
see only its own rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")

_meta = sa.MetaData()
files = sa.Table(
    "files",
    _meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(256)),
    sa.Column("filename", sa.String(1024)),
    sa.Column("purpose", sa.String(32)),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("created_at", sa.BigInteger),
)
STAMPS = (
    "created",
    "in_progress",
    "expires",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)
batches = sa.Table(
    "batches",
    _meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(256)),
    sa.Column("endpoint", sa.String(64)),
    sa.Column("input_file_id", sa.String(64)),
    sa.Column("completion_window", sa.String(16)),
    sa.Column("status", sa.String(16)),
    sa.Column("metadata", sa.Text),
    sa.Column("errors", sa.Text),
    sa.Column("output_file_id", sa.String(64)),
    sa.Column("error_file_id", sa.String(64)),
    sa.Column("total", sa.Integer),
    sa.Column("completed", sa.Integer),
    sa.Column("failed", sa.Integer),
    *(sa.Column(f"{s}_at", sa.BigInteger) for s in STAMPS),
    sa.Column("leased_by", sa.String(128)),
    sa.Column("lease_until", sa.Float),
)
results = sa.Table(
    "batch_results",
    _meta,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("line_no", sa.Integer, primary_key=True),
    sa.Column("custom_id", sa.String(512)),
    sa.Column("ok", sa.Boolean),
    sa.Column("line", sa.Text),
)


def database_url(store: str | None, batch_dir: Path) -> str:
    """--batch-store as SQLAlchemy takes it (postgresql:// → psycopg 3), or the SQLite file in --batch-dir."""
    if not store:
        return f"sqlite:///{batch_dir / 'batches.db'}"
    for scheme in ("postgresql://", "postgres://"):
        if store.startswith(scheme):
            return "postgresql+psycopg://" + store[len(scheme) :]
    return store


class Store:
    def __init__(self, url: str, file_dir: Path) -> None:
        self.file_dir = file_dir
        self.file_dir.mkdir(parents=True, exist_ok=True)
        self.sqlite = url.startswith("sqlite")
        connect_args = {"timeout": 30} if self.sqlite else {}
        self.db = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=not self.sqlite)
        if self.sqlite:
            sa.event.listen(self.db, "connect", _sqlite_pragmas)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (Alembic). Processes starting at once take turns: on a lock
        file beside the SQLite database, or on a transaction-level advisory lock in PostgreSQL."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with contextlib.ExitStack() as held:
            if (
                self.sqlite
            ):  # processes starting together on one file: one migrates, the others then find it done
                lock = held.enter_context(open(self.file_dir.parent / "batches.db.lock", "a"))
                fcntl.flock(lock, fcntl.LOCK_EX)
            with self.db.begin() as conn:
                if not self.sqlite:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(802571)"))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")

    def close(self) -> None:
        self.db.dispose()

    # --- files -------------------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.file_dir / file_id

    def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict:
        """Write the bytes (to a temporary name, synced, then renamed), then the row."""
        file_id = "file-" + uuid.uuid4().hex
        path = self.file_path(file_id)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        row = {
            "id": file_id,
            "owner": owner,
            "filename": filename,
            "purpose": purpose,
            "bytes": len(data),
            "created_at": int(time.time()),
        }
        with self.db.begin() as conn:
            conn.execute(files.insert().values(**row))
        return row

    def get_file(self, owner: str, file_id: str) -> dict | None:
        if not _storable(file_id):
            return None
        with self.db.connect() as conn:
            row = conn.execute(files.select().where(files.c.id == file_id, files.c.owner == owner)).first()
        return row._asdict() if row else None

    def list_files(
        self, owner: str, purpose: str | None, after: str | None, limit: int, desc: bool
    ) -> list[dict]:
        if not _storable(purpose, after):
            return []
        q = files.select().where(files.c.owner == owner)
        if purpose:
            q = q.where(files.c.purpose == purpose)
        order = (files.c.created_at.desc(), files.c.id.desc()) if desc else (files.c.created_at, files.c.id)
        with self.db.connect() as conn:
            if after:
                anchor = conn.execute(
                    files.select().where(files.c.id == after, files.c.owner == owner)
                ).first()
                if anchor is not None:
                    key = sa.tuple_(files.c.created_at, files.c.id)
                    bound = sa.tuple_(sa.literal(anchor.created_at), sa.literal(anchor.id))
                    q = q.where(key < bound if desc else key > bound)
            return [r._asdict() for r in conn.execute(q.order_by(*order).limit(limit))]

    def delete_file(self, owner: str, file_id: str) -> bool:
        if not _storable(file_id):
            return False
        with self.db.begin() as conn:
            gone = conn.execute(files.delete().where(files.c.id == file_id, files.c.owner == owner)).rowcount
        if gone:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(gone)

    def stored_bytes(self, owner: str) -> int:
        with self.db.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(files.c.bytes), 0)).where(files.c.owner == owner)
                ).scalar_one()
            )

    # --- batches -----------------------------------------------------------------------------------------------

    def add_batch(
        self,
        owner: str,
        endpoint: str,
        input_file_id: str,
        window_s: int,
        metadata: dict | None,
        total: int,
        errors: list[dict] | None,
    ) -> dict:
        now = int(time.time())
        row = {
            "id": "batch_" + uuid.uuid4().hex,
            "owner": owner,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "failed" if errors else "validating",
            "metadata": json.dumps(metadata) if metadata is not None else None,
            "errors": json.dumps(errors) if errors else None,
            "total": 0 if errors else total,
            "completed": 0,
            "failed": 0,
            "created_at": now,
            "expires_at": now + window_s,
            "failed_at": now if errors else None,
        }
        with self.db.begin() as conn:
            conn.execute(batches.insert().values(**row))
        return self.get_batch(owner, row["id"])  # type: ignore[return-value]

    def get_batch(self, owner: str | None, batch_id: str) -> dict | None:
        if not _storable(batch_id):
            return None
        q = batches.select().where(batches.c.id == batch_id)
        if owner is not None:
            q = q.where(batches.c.owner == owner)
        with self.db.connect() as conn:
            row = conn.execute(q).first()
        return row._asdict() if row else None

    def list_batches(self, owner: str, after: str | None, limit: int) -> list[dict]:
        """Newest first; `after` a batch id: the ones created before it."""
        if not _storable(after):
            return []
        q = batches.select().where(batches.c.owner == owner)
        with self.db.connect() as conn:
            if after:
                anchor = conn.execute(
                    batches.select().where(batches.c.id == after, batches.c.owner == owner)
                ).first()
                if anchor is not None:
                    key = sa.tuple_(batches.c.created_at, batches.c.id)
                    q = q.where(key < sa.tuple_(sa.literal(anchor.created_at), sa.literal(anchor.id)))
            rows = conn.execute(q.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit))
            return [r._asdict() for r in rows]

    def open_batches(self, owner: str) -> int:
        with self.db.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(batches.c.owner == owner, batches.c.status.in_(ACTIVE))
                ).scalar_one()
            )

    def cancel(self, owner: str, batch_id: str) -> dict | None:
        """validating / in_progress → cancelling (the worker finishes it as cancelled); others unchanged."""
        if not _storable(batch_id):
            return None
        with self.db.begin() as conn:
            conn.execute(
                batches.update()
                .where(
                    batches.c.id == batch_id,
                    batches.c.owner == owner,
                    batches.c.status.in_(("validating", "in_progress")),
                )
                .values(status="cancelling", cancelling_at=int(time.time()))
            )
        return self.get_batch(owner, batch_id)

    # --- the worker's side: leases, progress, results ----------------------------------------------------------

    def claim(self, replica: str, lease_s: float) -> dict | None:
        """Take the oldest active batch whose lease is free or lapsed (or already ours); None if none."""
        now = time.time()
        free = sa.or_(
            batches.c.leased_by.is_(None), batches.c.lease_until < now, batches.c.leased_by == replica
        )
        with self.db.connect() as conn:
            candidates = conn.execute(
                sa.select(batches.c.id)
                .where(batches.c.status.in_(ACTIVE), free)
                .order_by(batches.c.created_at, batches.c.id)
                .limit(8)
            ).all()
        for (batch_id,) in candidates:
            with self.db.begin() as conn:  # compare-and-set: only one replica's UPDATE matches
                taken = conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id, batches.c.status.in_(ACTIVE), free)
                    .values(leased_by=replica, lease_until=now + lease_s)
                ).rowcount
            if taken:
                return self.get_batch(None, batch_id)
        return None

    def renew(self, batch_id: str, replica: str, lease_s: float) -> dict | None:
        """Extend our lease; the batch's row as it is now, or None if the lease is no longer ours."""
        with self.db.begin() as conn:
            held = conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.leased_by == replica)
                .values(lease_until=time.time() + lease_s)
            ).rowcount
        return self.get_batch(None, batch_id) if held else None

    def release(self, batch_id: str, replica: str) -> None:
        with self.db.begin() as conn:
            conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.leased_by == replica)
                .values(leased_by=None, lease_until=None)
            )

    def advance(self, batch_id: str, replica: str, status: str, **values: object) -> bool:
        """Move our batch to `status` (stamping `<status>_at`), unless it was cancelled meanwhile (then a
        move to in_progress is refused: the cancel wins)."""
        q = batches.update().where(batches.c.id == batch_id, batches.c.leased_by == replica)
        if status == "in_progress":
            q = q.where(batches.c.status == "validating")
        with self.db.begin() as conn:
            return bool(
                conn.execute(q.values(status=status, **{f"{status}_at": int(time.time())}, **values)).rowcount
            )

    def done_lines(self, batch_id: str) -> set[int]:
        with self.db.connect() as conn:
            return set(
                conn.execute(sa.select(results.c.line_no).where(results.c.batch_id == batch_id)).scalars()
            )

    def record(self, batch_id: str, line_no: int, custom_id: str, ok: bool, line: dict) -> bool:
        """One line's result and the batch's count, in one transaction; False (nothing written) if the line was
        already done."""
        row = {
            "batch_id": batch_id,
            "line_no": line_no,
            "custom_id": custom_id,
            "ok": ok,
            "line": json.dumps(line),
        }
        insert = (sqlite.insert if self.sqlite else postgresql.insert)(results)
        with self.db.begin() as conn:
            added = conn.execute(
                insert.values(**row).on_conflict_do_nothing().returning(results.c.line_no)
            ).first()
            if added is not None:
                count = batches.c.completed if ok else batches.c.failed
                conn.execute(batches.update().where(batches.c.id == batch_id).values({count: count + 1}))
        return added is not None

    def result_lines(self, batch_id: str, ok: bool) -> Iterator[str]:
        with self.db.connect() as conn:
            rows = conn.execute(
                sa.select(results.c.line)
                .where(results.c.batch_id == batch_id, results.c.ok == ok)
                .order_by(results.c.line_no)
            )
            for (line,) in rows:
                yield line

    def status_counts(self) -> tuple[dict[str, int], int]:
        """Batches by status, and the lines of active batches not yet done (for /metrics)."""
        with self.db.connect() as conn:
            by_status = dict(
                conn.execute(sa.select(batches.c.status, sa.func.count()).group_by(batches.c.status)).all()
            )
            pending = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(batches.c.total - batches.c.completed - batches.c.failed), 0)
                ).where(batches.c.status.in_(ACTIVE))
            ).scalar_one()
        return {k: int(v) for k, v in by_status.items()}, int(pending)


def _storable(*values: str | None) -> bool:
    """Whether a client's id or filter could be in the store at all (ours are short and printable; PostgreSQL
    refuses NUL in text): one that could not is simply not found."""
    return all(v is None or (len(v) <= 256 and v.isprintable()) for v in values)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()
