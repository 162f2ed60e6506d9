"""OpenAI's Batch API on spare capacity: files (/v1/files), batches (/v1/batches), and the worker that runs a
batch's lines through the gateway itself, at a low engine priority and under a cap inside the admission budget.

    routes.py    the /v1/files and /v1/batches handlers (the key that made a file or batch owns it)
    lines.py     an input file's lines, checked up front (JSON, unique custom_id, method, url, body)
    store.py     metadata in a database (SQLite by default, PostgreSQL for several replicas; Alembic migrations),
                 file bytes in a directory
    worker.py    takes a batch under a lease, runs its lines in-process, records each result once, finalizes
    objects.py   rows → OpenAI's Batch and File objects
"""
