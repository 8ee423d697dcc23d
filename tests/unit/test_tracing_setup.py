"""Tracing set-up from the OTEL_* variables: off by default, console and OTLP when asked."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import trace_exporter

from agentflow_bus import tracing
from agentflow_control_plane.engine.writes import traceparent_for


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """No OTEL_* variable from the caller's environment; tracing reset after each test;
    the OTLP exporter replaced by a recorder (nothing is sent anywhere)."""
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    built: list[dict[str, Any]] = []

    class Recorder(trace_exporter.OTLPSpanExporter):
        def __init__(self, **kwargs: Any) -> None:
            built.append(kwargs)
            super().__init__(**kwargs)

        def export(self, spans: Any) -> Any:
            from opentelemetry.sdk.trace.export import SpanExportResult

            return SpanExportResult.SUCCESS

    monkeypatch.setattr(trace_exporter, "OTLPSpanExporter", Recorder)
    tracing.reset()
    yield built
    tracing.reset()


def test_without_configuration_tracing_is_a_no_op(clean: list[dict[str, Any]]) -> None:
    assert tracing.setup("agentflow-worker") is False
    assert tracing.ON is False
    assert isinstance(tracing.tracer(), trace.NoOpTracer)
    assert clean == [], "the OTLP exporter must not be constructed"
    with tracing.span("agentflow.step", attributes={"a": 1}) as span:
        assert span is None
        assert tracing.current_traceparent() is None
    assert tracing.span("x") is tracing.NOOP


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
        {"OTEL_SERVICE_NAME": "x"},
    ],
    ids=["sdk-disabled", "exporter-none", "no-exporter"],
)
def test_disabled_or_unconfigured_stays_off(environ: dict[str, str], clean: list[dict[str, Any]]) -> None:
    assert tracing.setup("agentflow-worker", environ) is False
    assert tracing.ON is False and clean == []


def test_console_exporter_prints_spans(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert tracing.setup("agentflow-control-plane") is True
    assert tracing.ON is True
    with tracing.span("agentflow.decision", attributes={"agentflow.run_id": "r-1"}) as span:
        assert span is not None
        assert tracing.current_traceparent() == tracing.format_traceparent(span.get_span_context())
    tracing.flush()
    out = capsys.readouterr().out
    assert '"name": "agentflow.decision"' in out
    assert '"agentflow.run_id": "r-1"' in out
    assert '"service.name": "agentflow-control-plane"' in out


def test_otlp_endpoint_turns_on_the_otlp_exporter(clean: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-workers")
    assert tracing.setup("agentflow-worker") is True
    assert len(clean) == 1
    provider: Any = tracing._provider
    assert provider.resource.attributes["service.name"] == "my-workers"  # OTEL_SERVICE_NAME wins


def test_setup_is_idempotent_and_keeps_an_installed_provider(clean: list[dict[str, Any]]) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    tracing.install(provider)
    assert tracing.setup("agentflow-worker", {"OTEL_TRACES_EXPORTER": "otlp"}) is True
    assert tracing._provider is provider and clean == []


REFUSED = [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    (
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ),
]


@pytest.mark.parametrize(("environ", "named"), REFUSED)
def test_settings_it_cannot_honor_are_refused_naming_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(tracing.TracingConfigError, match=named):
        tracing.setup("agentflow-worker", environ)
    assert tracing.ON is False


def test_traceparent_parsing() -> None:
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = tracing.parse(good)
    assert ctx is not None and ctx.is_valid and ctx.is_remote
    assert tracing.format_traceparent(ctx) == good
    for bad in (None, "", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", "ff" + good[2:],
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                "00-0af7651916cd43dd8448eb211c80319x-b7ad6b7169203331-01", good + "-extra"):  # fmt: skip
        assert tracing.parse(bad) is None, bad


def test_step_messages_stay_in_the_runs_trace_while_tracing_is_off() -> None:
    run_id = uuid.uuid4()
    plain = traceparent_for(run_id)
    assert plain.split("-")[1] == run_id.hex and tracing.parse(plain) is not None
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    following = traceparent_for(run_id, stored)
    assert following.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert following.split("-")[2] != "b7ad6b7169203331"  # a span of its own
