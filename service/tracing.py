"""Traces for the routes the service answers itself (service/http/), configured the way BentoML documents tracing
(its `tracing` settings: an exporter and a sample rate), through BentoML's own tracer provider.

Unconfigured, `TRACER` stays None and a request pays one check. Configured, each request gets a server span
(continuing the trace of a `traceparent` header), and a model call a child span with the model, the
request's images and the batch's images; the trace ID goes into the access line.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

Scope = MutableMapping[str, Any]  # an ASGI request's scope (the inference room, which has no ASGI, uses this too)

TRACER: Any = None  # an OpenTelemetry tracer once `configure` found tracing on in this worker


def configure() -> None:
    """Look at BentoML's tracing settings in this worker (after BentoML has loaded its configuration)."""
    global TRACER
    from bentoml._internal.configuration.containers import BentoMLContainer

    exporter = BentoMLContainer.tracing.exporter_type.get()
    if exporter and (BentoMLContainer.tracing.sample_rate.get() or 0) > 0:
        TRACER = BentoMLContainer.tracer_provider.get().get_tracer("cifar10.service")


def request_span(scope: Scope, route: str) -> AbstractContextManager:
    """The request's server span, continuing the caller's trace; a no-op without tracing."""
    if TRACER is None:
        return nullcontext()
    from opentelemetry import propagate, trace

    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    return TRACER.start_as_current_span(
        f"{scope['method']} {route}",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": scope["method"], "http.route": route},
    )


def continued(scope: Scope) -> Scope:
    """`scope` with the current span's traceparent in its headers, so that BentoML's own middleware continues
    this request's trace (as a child span) on the routes it answers; `scope` itself without tracing."""
    if TRACER is None:
        return scope
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    names = {name.encode() for name in carrier}
    headers = [(k, v) for k, v in scope["headers"] if k not in names]
    return {**scope, "headers": [*headers, *((k.encode(), v.encode()) for k, v in carrier.items())]}


def model_span(model: str, images: int) -> AbstractContextManager:
    """A child span around a request's model call; a no-op without tracing."""
    if TRACER is None:
        return nullcontext()
    return TRACER.start_as_current_span(
        "cifar10.model_call", attributes={"cifar10.model": model, "cifar10.images": images}
    )


def trace_id() -> str:
    """The current span's trace ID as 32 hex digits, or "" without tracing."""
    if TRACER is None:
        return ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
