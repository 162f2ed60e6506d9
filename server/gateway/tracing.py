"""OpenTelemetry traces of generation requests, off unless `--otlp-traces-endpoint` is set.

One span per request, a child of the caller's `traceparent` (W3C Trace Context), with the request id, the key
name and the model as attributes, and its phases as children:

    POST /v1/chat/completions          the request, until its response (or stream) ends
      admission                        the in-flight budget and the key's limits
      template                         messages -> token ids
      queue                            the engine's queue: arrival to first scheduled   } from vLLM's request
      prefill                          first scheduled to first token                   } stats, stamped in the
      decode                           first token to last token                        } engine core

The engine phases come from vLLM's per-request stats (EngineTimings), so they are exact for the engine and
present whenever vLLM keeps request stats (its default).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from server.gateway.engine import EngineTimings

log = logging.getLogger("dsv2.tracing")
_OFF = nullcontext()


def tracer_from_settings(endpoint: str | None) -> Tracer | None:
    """An OTLP/HTTP-exporting tracer for `endpoint`, or None (tracing off)."""
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from server import __version__

    provider = TracerProvider(
        resource=Resource.create({"service.name": "dsv2-serve", "service.version": __version__})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    log.info("exporting traces to %s", endpoint)
    return provider.get_tracer("dsv2-serve", __version__)


class RequestTrace:
    """The spans of one request; every method does nothing when tracing is off."""

    __slots__ = ("tracer", "span", "context")

    def __init__(
        self, tracer: Tracer | None, name: str, headers: Mapping[str, str], attributes: dict
    ) -> None:
        self.tracer = tracer
        self.span = self.context = None
        if tracer is None:
            return
        from opentelemetry import propagate, trace

        parent = propagate.extract(dict(headers))
        self.span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
        self.context = trace.set_span_in_context(self.span)

    def phase(self, name: str) -> AbstractContextManager[None]:
        """A child span around a block; with tracing off, a shared no-op (the request path pays nothing)."""
        return _OFF if self.tracer is None else self._phase(name)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        span = self.tracer.start_span(name, context=self.context)
        try:
            yield
        finally:
            span.end()

    def engine(self, timings: EngineTimings) -> None:
        """The engine's queue, prefill and decode phases, at the times the engine stamped."""
        if self.tracer is None:
            return
        for name, start, end in (
            ("queue", timings.queued, timings.scheduled),
            ("prefill", timings.scheduled, timings.first_token),
            ("decode", timings.first_token, timings.last_token),
        ):
            span = self.tracer.start_span(name, context=self.context, start_time=_ns(start))
            span.end(end_time=_ns(max(start, end)))

    def set(self, key: str, value: str | int | float) -> None:
        if self.span is not None:
            self.span.set_attribute(key, value)

    def __call__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """Ends the request span (an AsyncExitStack callback: when the response, or its stream, is over)."""
        if self.span is None:
            return False
        if exc is not None:
            from opentelemetry.trace import Status, StatusCode

            status = getattr(exc, "status", None)
            self.span.set_attribute("error.type", type(exc).__name__)
            if status is not None:
                self.span.set_attribute("http.response.status_code", status)
            self.span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
        self.span.end()
        return False


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
