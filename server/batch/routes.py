"""Thin handlers for OpenAI's Files (purpose "batch") and Batches APIs. A file or batch belongs to the key that
made it: another key gets 404, as if it did not exist."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from server.batch import lines
from server.batch.objects import batch_object, file_object
from server.batch.worker import Batches
from server.gateway import paths
from server.gateway.errors import APIError
from server.gateway.intake import IntakeRoute
from server.gateway.tenants import ANONYMOUS

router = APIRouter(route_class=IntakeRoute, tags=["batches"])
WINDOWS = {"24h": 24 * 3600}


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str = Field(description="/v1/chat/completions, /v1/completions or /v1/responses.")
    completion_window: str = Field(description='"24h".')
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def _batches(request: Request) -> Batches:
    return request.app.state.batches


def _owner(request: Request) -> str:
    return getattr(request.state, "tenant", ANONYMOUS).name


def _not_found(kind: str, ident: str, param: str) -> APIError:
    return APIError(f"No such {kind}: {ident}", 404, param=param, code="not_found")


# --- files ------------------------------------------------------------------------------------------------------


@router.post(paths.FILES, summary="Upload a JSONL file of batch requests (purpose: batch).")
async def upload_file(
    request: Request,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> JSONResponse:
    svc, owner = _batches(request), _owner(request)
    if purpose != "batch":
        raise APIError(
            f"purpose {purpose!r} is not supported; this server stores files for batches only",
            param="purpose",
        )
    data = await file.read()
    limit = svc.settings.batch_max_file_bytes
    if len(data) > limit:
        raise APIError(f"the file has {len(data)} bytes, more than the limit of {limit}", 413, param="file")
    cap = svc.settings.batch_max_stored_bytes
    if cap is not None:
        stored = await asyncio.to_thread(svc.store.stored_bytes, owner)
        if stored + len(data) > cap:
            raise APIError(
                f"key {owner!r} stores {stored} bytes of files; this one would take it past its cap of {cap}; "
                "delete files first",
                param="file",
                code="storage_limit_exceeded",
            )
    name = (file.filename or "upload.jsonl").replace("\0", "")[:255].encode("utf-8", "replace").decode()
    row = await asyncio.to_thread(svc.store.add_file, owner, name, purpose, data)
    return JSONResponse(file_object(row))


@router.get(paths.FILES, summary="The key's files, newest first.")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Field(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> JSONResponse:
    svc = _batches(request)
    rows = await asyncio.to_thread(
        svc.store.list_files, _owner(request), purpose, after, limit + 1, order == "desc"
    )
    return JSONResponse(_page([file_object(r) for r in rows], limit))


@router.get(paths.FILE, summary="A file's metadata.")
async def retrieve_file(file_id: str, request: Request) -> JSONResponse:
    row = await asyncio.to_thread(_batches(request).store.get_file, _owner(request), file_id)
    if row is None:
        raise _not_found("file", file_id, "file_id")
    return JSONResponse(file_object(row))


@router.get(paths.FILE_CONTENT, summary="A file's bytes (a batch's input, output or error lines).")
async def file_content(file_id: str, request: Request) -> Response:
    svc = _batches(request)
    row = await asyncio.to_thread(svc.store.get_file, _owner(request), file_id)
    if row is None:
        raise _not_found("file", file_id, "file_id")
    data = await asyncio.to_thread(svc.store.file_path(file_id).read_bytes)
    return Response(data, media_type="application/octet-stream")


@router.delete(paths.FILE, summary="Delete a file.")
async def delete_file(file_id: str, request: Request) -> JSONResponse:
    if not await asyncio.to_thread(_batches(request).store.delete_file, _owner(request), file_id):
        raise _not_found("file", file_id, "file_id")
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


# --- batches ----------------------------------------------------------------------------------------------------


@router.post(paths.BATCHES, summary="Create a batch from an uploaded file; it runs on spare capacity.")
async def create_batch(body: CreateBatchRequest, request: Request) -> JSONResponse:
    svc, owner = _batches(request), _owner(request)
    if body.endpoint not in lines.ENDPOINTS:
        raise APIError(
            f"endpoint {body.endpoint!r} is not supported; one of {', '.join(lines.ENDPOINTS)}",
            param="endpoint",
        )
    if body.completion_window not in WINDOWS:
        raise APIError(
            f'completion_window {body.completion_window!r} is not supported; use "24h"',
            param="completion_window",
        )
    row = await asyncio.to_thread(svc.store.get_file, owner, body.input_file_id)
    if row is None:
        raise _not_found("file", body.input_file_id, "input_file_id")
    if row["purpose"] != "batch":
        raise APIError(
            f"file {body.input_file_id} has purpose {row['purpose']!r}, not batch", param="input_file_id"
        )
    cap = svc.settings.batch_max_open_batches
    if cap is not None and await asyncio.to_thread(svc.store.open_batches, owner) >= cap:
        raise APIError(
            f"key {owner!r} has {cap} batches not yet finished, its cap; wait for one to end or cancel one",
            429,
            code="rate_limit_exceeded",
        )
    data = await asyncio.to_thread(svc.store.file_path(body.input_file_id).read_bytes)
    parsed, errors = await asyncio.to_thread(lines.parse, data, body.endpoint)
    batch = await asyncio.to_thread(
        svc.store.add_batch,
        owner,
        body.endpoint,
        body.input_file_id,
        WINDOWS[body.completion_window],
        body.metadata,
        len(parsed),
        errors,
    )
    return JSONResponse(batch_object(batch))


@router.get(paths.BATCHES, summary="The key's batches, newest first (cursor: after).")
async def list_batches(
    request: Request, after: str | None = None, limit: Annotated[int, Field(ge=1, le=100)] = 20
) -> JSONResponse:
    rows = await asyncio.to_thread(_batches(request).store.list_batches, _owner(request), after, limit + 1)
    return JSONResponse(_page([batch_object(r) for r in rows], limit))


@router.get(paths.BATCH, summary="A batch: its status, counts and result files.")
async def retrieve_batch(batch_id: str, request: Request) -> JSONResponse:
    row = await asyncio.to_thread(_batches(request).store.get_batch, _owner(request), batch_id)
    if row is None:
        raise _not_found("batch", batch_id, "batch_id")
    return JSONResponse(batch_object(row))


@router.post(paths.BATCH_CANCEL, summary="Cancel a batch: cancelling, then cancelled with what was done.")
async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
    row = await asyncio.to_thread(_batches(request).store.cancel, _owner(request), batch_id)
    if row is None:
        raise _not_found("batch", batch_id, "batch_id")
    return JSONResponse(batch_object(row))


def _page(data: list[dict], limit: int) -> dict:
    more, data = len(data) > limit, data[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }
