"""OpenTelemetry tracing for the control plane and the workers, set up from the standard
``OTEL_*`` environment variables only.

Off unless an exporter is configured: then no SDK is loaded, :data:`ON` stays False and
the engine's hot paths test that one flag and do nothing else. On when
``OTEL_TRACES_EXPORTER`` names ``otlp`` and/or ``console`` (a comma-separated list), or
when it is unset and ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
is set. ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off whatever
else is set. The SDK and the exporter read the rest themselves (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_BSP_*``,
``OTEL_EXPORTER_OTLP_HEADERS``/``_TIMEOUT``/``_COMPRESSION``/``_CERTIFICATE``...).

The OTLP exporter speaks http/protobuf (port 4318); ``grpc`` is refused with a clear
error rather than silently dropping every span.

Trace context travels as W3C ``traceparent`` strings (NATS headers, ``runs.traceparent``),
so the helpers here take and return those strings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes

from agentflow_core.errors import ConfigurationError

log = logging.getLogger("agentflow.tracing")

#: True while spans are recorded: hot paths test this before doing anything else
ON = False

SERVER = SpanKind.SERVER
CLIENT = SpanKind.CLIENT
PRODUCER = SpanKind.PRODUCER
CONSUMER = SpanKind.CONSUMER
INTERNAL = SpanKind.INTERNAL

EXPORTERS = ("otlp", "console", "none")

_tracer: trace.Tracer = trace.NoOpTracer()
#: the provider spans go to (created by setup() or given to install())
_provider: trace.TracerProvider | None = None
#: whether setup() created the provider (and so shuts it down)
_owned = False
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()
#: what :func:`span` returns while tracing is off (reusable, yields None)
NOOP = _NULL


class TracingConfigError(ConfigurationError):
    """An ``OTEL_*`` variable asks for something this build cannot do."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def exporters_from_env(environ: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for; [] means tracing stays off."""
    if _truthy(environ.get("OTEL_SDK_DISABLED")):
        return []
    raw = environ.get("OTEL_TRACES_EXPORTER")
    if raw is None or not raw.strip():
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER: unsupported exporter {unknown[0]!r} (supported: otlp, console, none)"
        )
    if "none" in names:
        return []
    return list(dict.fromkeys(names))


def _check_protocol(environ: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name)
        if value:
            if value.strip().lower() != "http/protobuf":
                raise TracingConfigError(
                    f"{name}={value!r} is not supported: AgentFlow exports OTLP over http/protobuf "
                    "(the collector's port 4318); unset it or set http/protobuf"
                )
            return  # the signal-specific variable wins over the general one


def setup(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on if the ``OTEL_*`` variables configure an exporter; returns :data:`ON`.

    Idempotent: once a provider is in place (an earlier call, or :func:`install`), it is
    kept. ``service_name`` is used unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES``
    name the service. Raises :class:`TracingConfigError` for settings it cannot honor.
    """
    if _provider is not None:
        return ON
    env = os.environ if environ is None else environ
    names = exporters_from_env(env)
    if not names:
        return False
    if "otlp" in names:
        _check_protocol(env)
    # The SDK is imported only when tracing is on: an idle process never loads it.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            # The stdout of now, not of when the SDK was imported (its default).
            exporter = ConsoleSpanExporter(service_name=str(resource.attributes.get(SERVICE_NAME)), out=sys.stdout)
        # Batching: spans are handed to a background thread, never exported on the event loop.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _use(provider, owned=True)
    log.info("tracing on: service %s, exporter(s) %s", resource.attributes.get(SERVICE_NAME), ", ".join(names))
    return True


def install(provider: trace.TracerProvider) -> None:
    """Record spans with ``provider`` (tests, or a host process with its own SDK setup)."""
    _use(provider, owned=False)


def _use(provider: trace.TracerProvider, *, owned: bool) -> None:
    global ON, _tracer, _provider, _owned
    _provider, _owned = provider, owned
    _tracer = provider.get_tracer("agentflow")
    ON = True


def reset() -> None:
    """Back to off (tests). A provider this module created is shut down (spans flushed)."""
    global ON, _tracer, _provider, _owned
    provider, owned = _provider, _owned
    ON, _tracer, _provider, _owned = False, trace.NoOpTracer(), None, False
    if owned and provider is not None:
        provider.shutdown()  # type: ignore[attr-defined]


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans still buffered (before a process exits)."""
    provider = _provider
    if provider is not None and hasattr(provider, "force_flush"):
        with contextlib.suppress(Exception):
            provider.force_flush(timeout_ms)


def tracer() -> trace.Tracer:
    return _tracer


# --- W3C trace context --------------------------------------------------------------------


def parse(traceparent: str | None) -> SpanContext | None:
    """The span context of a ``traceparent`` header value, or None when it is not a valid one."""
    if not traceparent or len(traceparent) < 55 or traceparent[2] != "-" or traceparent[35] != "-":
        return None
    version = traceparent[:2]
    if version == "ff" or (version == "00" and len(traceparent) != 55):
        return None
    try:
        trace_id = int(traceparent[3:35], 16)
        span_id = int(traceparent[36:52], 16)
        flags = int(traceparent[53:55], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or traceparent[52] != "-":
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0x01))


def format_traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags) & 0x01:02x}"


def fresh_traceparent(trace_id_hex: str, sampled: bool = True) -> str:
    """A traceparent in trace ``trace_id_hex`` with a new random span id."""
    return f"00-{trace_id_hex}-{os.urandom(8).hex()}-{'01' if sampled else '00'}"


def traceparent_of(span: Span | None) -> str | None:
    if span is None:
        return None
    ctx = span.get_span_context()
    return format_traceparent(ctx) if ctx.is_valid else None


def current_traceparent() -> str | None:
    """The traceparent of the current span (None when tracing is off or no span is active)."""
    if not ON:
        return None
    return traceparent_of(trace.get_current_span())


def has_current_span() -> bool:
    return trace.get_current_span().get_span_context().is_valid


def context_of(traceparent: str | None) -> otel_context.Context | None:
    """A context whose parent is the span ``traceparent`` names; None if it is not valid."""
    ctx = parse(traceparent)
    if ctx is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(ctx), otel_context.Context())


def link_to(traceparent: str | None, attributes: Attributes = None) -> list[Link]:
    ctx = parse(traceparent)
    return [] if ctx is None else [Link(ctx, attributes)]


# --- spans --------------------------------------------------------------------------------


def start(
    name: str,
    *,
    parent: str | otel_context.Context | None = None,
    kind: SpanKind = INTERNAL,
    attributes: Attributes = None,
    links: Sequence[Link] | None = None,
) -> Span:
    """Start a span (not made current). ``parent``: a traceparent string or a context; None
    (or an invalid traceparent) means the current span. Only call when :data:`ON`."""
    ctx = context_of(parent) if isinstance(parent, str) else parent
    return _tracer.start_span(name, context=ctx, kind=kind, attributes=attributes, links=links)


@contextlib.contextmanager
def _active(span: Span) -> Iterator[Span]:
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


def span(
    name: str,
    *,
    parent: str | otel_context.Context | None = None,
    kind: SpanKind = INTERNAL,
    attributes: Attributes = None,
    links: Sequence[Link] | None = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """``with span(...) as s:`` a current span, ended on exit, an escaping exception recorded
    with status ERROR. When tracing is off, a shared no-op context yielding None."""
    if not ON:
        return _NULL
    return _active(start(name, parent=parent, kind=kind, attributes=attributes, links=links))


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (nothing when off or no span is recording)."""
    if ON:
        current = trace.get_current_span()
        if current.is_recording():
            current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def fail(description: str, target: Span | None = None) -> None:
    """Mark ``target`` (default: the current span) failed, with why."""
    if not ON:
        return
    target = target if target is not None else trace.get_current_span()
    if target.is_recording():
        target.set_status(Status(StatusCode.ERROR, description[:500]))
