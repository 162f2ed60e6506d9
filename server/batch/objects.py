"""Store rows → OpenAI's Batch and File objects, as the openai SDK and OpenAI's schema read them."""

from __future__ import annotations

import json


def batch_object(row: dict) -> dict:
    """A batch row → OpenAI's Batch object (fields without a value left out, as its schema has them)."""
    errors = json.loads(row["errors"]) if row["errors"] else None
    return _present(
        {
            "id": row["id"],
            "object": "batch",
            "endpoint": row["endpoint"],
            "errors": {"object": "list", "data": errors} if errors else None,
            "input_file_id": row["input_file_id"],
            "completion_window": row["completion_window"],
            "status": row["status"],
            "output_file_id": row["output_file_id"],
            "error_file_id": row["error_file_id"],
            "created_at": row["created_at"],
            "in_progress_at": row["in_progress_at"],
            "expires_at": row["expires_at"],
            "finalizing_at": row["finalizing_at"],
            "completed_at": row["completed_at"],
            "failed_at": row["failed_at"],
            "expired_at": row["expired_at"],
            "cancelling_at": row["cancelling_at"],
            "cancelled_at": row["cancelled_at"],
            "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        }
    )


def file_object(row: dict) -> dict:
    return _present(
        {
            "id": row["id"],
            "object": "file",
            "bytes": row["bytes"],
            "created_at": row["created_at"],
            "filename": row["filename"],
            "purpose": row["purpose"],
            "status": "processed",
        }
    )


def _present(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if v is not None}
