"""Thin HTTP handlers: pydantic validates the body, one serving function answers it."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.responses import JSONResponse, PlainTextResponse, Response

from server import __version__
from server.gateway import anthropic, bodies, paths, responses, serving
from server.gateway import protocol as p
from server.gateway.errors import APIError, StartingUp
from server.gateway.health import Health
from server.gateway.intake import IntakeRoute

router = APIRouter(route_class=IntakeRoute)

_ERRORS = {
    status: {"model": bodies.ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request (the `param` field names the bad value).",
        401: "Missing or wrong API key.",
        404: "Unknown model.",
        499: "The client closed the connection before the response (never seen by the client).",
        413: "Request body too large.",
        429: "The in-flight sequence budget is full; see Retry-After.",
        500: "Internal error.",
        503: "Engine not ready, dead, or the server is draining.",
    }.items()
}


def _stream_response(model: type) -> dict:
    return {
        200: {
            "model": model,
            "description": "JSON, or with `stream: true` a text/event-stream of `data: {chunk}` events ending in "
            "`data: [DONE]`.",
            # OpenAPI < 3.2: for text/event-stream, `schema` describes one event.
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "data": {
                                "type": "string",
                                "description": f"A JSON {model.__name__} chunk, an error object, or [DONE].",
                            },
                            "event": {"type": "string"},
                        },
                        "required": ["data"],
                    }
                }
            },
        },
        **_ERRORS,
    }


def services(request: Request) -> serving.Services:
    startup = request.app.state.startup
    if not startup.serving:
        raise StartingUp(startup)
    return request.app.state.services


def request_id(request: Request) -> str:
    return request.state.request_id


@router.post(paths.CHAT, responses=_stream_response(bodies.ChatCompletion), response_model=None)
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
    return await serving.chat(services(request), body, request, request_id(request))


@router.post(paths.COMPLETIONS, responses=_stream_response(bodies.Completion), response_model=None)
async def completions(body: p.CompletionRequest, request: Request) -> Response:
    return await serving.completion(services(request), body, request, request_id(request))


@router.post(
    paths.RESPONSES,
    response_model=None,
    summary="OpenAI Responses API, stateless (store, previous_response_id, background: 400).",
    responses={
        200: {"description": "A Response, or with `stream: true` its typed events (`event: response.*`)."},
        **_ERRORS,
    },
)
async def create_response(body: responses.ResponsesRequest, request: Request) -> Response:
    return await serving.create_response(services(request), body, request, request_id(request))


@router.post(
    paths.MESSAGES,
    response_model=None,
    summary="Anthropic Messages API (errors in Anthropic's shape on this path).",
    responses={200: {"description": "An Anthropic message, or with `stream: true` its event stream."}},
)
async def messages(body: anthropic.MessagesRequest, request: Request) -> Response:
    return await serving.messages(services(request), body, request, request_id(request))


@router.post(paths.COUNT_TOKENS, summary="Anthropic: tokens the request's prompt takes.")
async def count_tokens(body: anthropic.CountTokensRequest, request: Request) -> JSONResponse:
    return JSONResponse(await serving.count_tokens(services(request), body, request))


@router.get(paths.MODELS, response_model=bodies.ModelList, responses={401: _ERRORS[401]})
async def models(request: Request) -> JSONResponse:
    return JSONResponse(serving.models(services(request)))


@router.get(paths.MODEL, response_model=bodies.ModelCard, responses={401: _ERRORS[401], 404: _ERRORS[404]})
async def model(model_id: str, request: Request) -> JSONResponse:
    return JSONResponse(serving.model(services(request), model_id))


# vLLM's runtime LoRA API, included only with --allow-runtime-lora-updating; with keys, for admin keys only.
lora_router = APIRouter(route_class=IntakeRoute)
_ADMIN_ONLY = {"model": bodies.ErrorResponse, "description": "The key is not an admin key (`admin: true`)."}


@lora_router.post(
    paths.LOAD_LORA,
    response_class=PlainTextResponse,
    responses={400: _ERRORS[400], 401: _ERRORS[401], 403: _ADMIN_ONLY},
    summary="Load a LoRA adapter (admin keys); requests then select it with `model: lora_name`.",
)
async def load_lora_adapter(body: p.LoadAdapterRequest, request: Request) -> Response:
    return await serving.load_adapter(services(request), body, request)


@lora_router.post(
    paths.UNLOAD_LORA,
    response_class=PlainTextResponse,
    responses={
        401: _ERRORS[401],
        403: _ADMIN_ONLY,
        404: {"model": bodies.ErrorResponse, "description": "No such adapter."},
    },
    summary="Stop serving a LoRA adapter (admin keys; requests running with it finish).",
)
async def unload_lora_adapter(body: p.UnloadAdapterRequest, request: Request) -> Response:
    return await serving.unload_adapter(services(request), body, request)


def health_of(request: Request) -> Health:
    return request.app.state.health


@router.get(
    paths.HEALTH,
    response_model=bodies.Status,
    responses={503: {"model": bodies.ErrorResponse, "description": "Engine dead or stalled."}},
    summary="Liveness: the engine is alive and, with requests waiting, makes steps.",
)
async def health(request: Request) -> JSONResponse:
    if not request.app.state.startup.serving:
        return StartingUp(request.app.state.startup).response()
    ok, reason = health_of(request).live()
    if ok:
        return JSONResponse({"status": "ok"})
    return APIError(f"not live: {reason}", 503, code="not_live").response()


@router.get(
    paths.READY,
    response_model=bodies.Status,
    responses={
        503: {"model": bodies.ErrorResponse, "description": "Not ready: starting, draining, engine failing."}
    },
    summary="Readiness: started, not draining, engine alive, generation proven recently; answers within 1 s.",
)
async def ready(request: Request) -> JSONResponse:
    if not request.app.state.startup.serving:
        return StartingUp(request.app.state.startup).response()
    ok, reason = await health_of(request).ready()
    if ok:
        return JSONResponse({"status": "ok"})
    return APIError(f"not ready: {reason}", 503, code="not_ready").response()


@router.get(
    paths.METRICS,
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text."}
    },
)
async def metrics(request: Request) -> Response:
    return Response(await request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)


@router.get(paths.VERSION, response_model=bodies.Version)
async def version() -> JSONResponse:
    try:
        from vllm import __version__ as vllm_version
    except Exception:  # the gateway's unit tests may run without vLLM importable
        vllm_version = None
    return JSONResponse({"version": __version__, "vllm": vllm_version})
