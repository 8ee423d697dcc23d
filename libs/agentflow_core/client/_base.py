"""What the sync and async clients share: configuration, the request descriptions of
every endpoint, the retry policy, error mapping and the Server-Sent Events decoder.
Nothing here does I/O, so both clients run exactly the same decisions."""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from agentflow_core import errors
from agentflow_core.client import models

T = TypeVar("T")

DEFAULT_BASE_URL: Final = "http://127.0.0.1:8080"
#: per attempt: 5 s to connect, 30 s for everything else
DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)
DEFAULT_MAX_RETRIES: Final = 2
#: the server sends a keepalive comment every 15 s; three missed ones mean the connection is dead
DEFAULT_STREAM_IDLE_TIMEOUT: Final = 45.0
#: consecutive reconnects of an event stream without receiving anything (a control-plane restart takes seconds)
DEFAULT_STREAM_RECONNECTS: Final = 8
USER_AGENT: Final = "agentflow-python-sdk/0.1.0"


class NotGiven:
    """The default of ``timeout=`` parameters: "use the client's timeout" (``None`` means no timeout)."""

    _instance: NotGiven | None = None

    def __new__(cls) -> NotGiven:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Final = NotGiven()

#: ``NOT_GIVEN``: the client's default; ``None``: no timeout; seconds or an :class:`httpx.Timeout`: that
Timeout = float | httpx.Timeout | None | NotGiven


def base_url_from(base_url: str | None) -> str:
    # AGENTFLOW_API_URL is what `agentflow up` prints and the CLI reads; AGENTFLOW_URL is the short form.
    url = base_url or os.environ.get("AGENTFLOW_URL") or os.environ.get("AGENTFLOW_API_URL") or DEFAULT_BASE_URL
    if not url.startswith(("http://", "https://")):
        raise errors.ConfigurationError(f"base_url must start with http:// or https:// (got '{url}')")
    return url.rstrip("/")


def token_from(token: str | None) -> str | None:
    return token if token is not None else (os.environ.get("AGENTFLOW_TOKEN") or None)


def httpx_timeout(timeout: Timeout) -> httpx.Timeout | float | httpx._client.UseClientDefault | None:
    if isinstance(timeout, NotGiven):
        return httpx.USE_CLIENT_DEFAULT
    return timeout


def stream_timeout(client_default: httpx.Timeout, timeout: Timeout, idle: float) -> httpx.Timeout:
    """For event streams ``timeout`` bounds the wait for the next bytes (keepalives count),
    not the whole stream, which may last for hours."""
    if isinstance(timeout, NotGiven):
        return httpx.Timeout(client_default.connect, read=idle, write=client_default.write, pool=client_default.pool)
    if timeout is None or isinstance(timeout, httpx.Timeout):
        return httpx.Timeout(timeout)
    return httpx.Timeout(float(timeout))


def capped(timeout: httpx.Timeout, remaining: float) -> httpx.Timeout:
    """``timeout`` with no part longer than ``remaining`` seconds (a caller's deadline)."""
    remaining = max(remaining, 0.001)

    def cap(value: float | None) -> float:
        return remaining if value is None else min(value, remaining)

    return httpx.Timeout(
        connect=cap(timeout.connect), read=cap(timeout.read), write=cap(timeout.write), pool=cap(timeout.pool)
    )


def id_str(value: str | uuid.UUID) -> str:
    return quote(str(value), safe="")


def clean_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, uuid.UUID | Decimal):
            out[key] = str(value)
        else:
            out[key] = value
    return out


def json_ready(value: Any) -> Any:
    """Decimals (exact dollar amounts) as strings, which the API parses exactly."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


# --- requests -------------------------------------------------------------------------------


@dataclass
class Call(Generic[T]):
    """One API call: what to send, whether it may be sent twice, how to read the answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: sending it twice does no harm: retried after 429/503 and errors past the connect phase
    retry_safe: bool = False
    #: error statuses whose body is the answer (``/readyz``'s 503), parsed instead of raised
    accept: frozenset[int] = frozenset()


def _model(cls: type[T]) -> Callable[[httpx.Response], T]:
    adapter = TypeAdapter(cls)

    def parse(response: httpx.Response) -> T:
        return adapter.validate_json(response.content)

    return parse


def _none(response: httpx.Response) -> None:
    return None


def _created_run(response: httpx.Response) -> models.CreatedRun:
    run = models.CreatedRun.model_validate_json(response.content)
    run.created = response.status_code == 201
    return run


def put_workflow(name: str, spec: Mapping[str, Any] | str | bytes) -> Call[models.WorkflowVersion]:
    if isinstance(spec, Mapping):
        body = json.dumps(json_ready(spec)).encode()
        content_type = "application/json"
    else:
        body = spec.encode() if isinstance(spec, str) else spec
        content_type = "application/yaml"
    # The same spec again is no new version: safe to repeat.
    return Call("PUT", f"/v1/workflows/{id_str(name)}", _model(models.WorkflowVersion), content=body,
                headers={"Content-Type": content_type}, retry_safe=True)  # fmt: skip


def workflow_name(spec: Mapping[str, Any] | str | bytes) -> str:
    """The ``name`` member of a spec (a mapping, or YAML/JSON text)."""
    if isinstance(spec, Mapping):
        parsed: Any = spec
    else:
        import yaml  # only when a text spec comes without a name

        try:
            parsed = yaml.safe_load(spec)
        except yaml.YAMLError as exc:
            raise errors.ValidationFailed(f"spec: not valid YAML/JSON: {exc}") from exc
    name = parsed.get("name") if isinstance(parsed, Mapping) else None
    if not isinstance(name, str) or not name:
        raise errors.ValidationFailed("name: the spec has no 'name'; pass name=")
    return name


def get_workflow(name: str, version: int | None) -> Call[models.Workflow]:
    return Call("GET", f"/v1/workflows/{id_str(name)}", _model(models.Workflow),
                params=clean_params({"version": version}), retry_safe=True)  # fmt: skip


def create_run(
    workflow: str, run_input: Any, version: int | None, idempotency_key: str | None
) -> Call[models.CreatedRun]:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    body = {"workflow": workflow, "input": json_ready(run_input)}
    if version is not None:
        body["version"] = version
    # With a key the server returns the first request's run to a repeat (and 409s a different
    # request reusing it), so a retry can never start a second run.
    return Call("POST", "/v1/runs", _created_run, json=body, headers=headers, retry_safe=bool(idempotency_key))


def estimate_run(workflow: str, run_input: Any, version: int | None) -> Call[models.DryRun]:
    body = {"workflow": workflow, "input": json_ready(run_input)}
    if version is not None:
        body["version"] = version
    return Call("POST", "/v1/runs", _model(models.DryRun), params={"dry_run": "true"}, json=body, retry_safe=True)


def get_run(run_id: str | uuid.UUID) -> Call[models.Run]:
    return Call("GET", f"/v1/runs/{id_str(run_id)}", _model(models.Run), retry_safe=True)


def list_runs(status: str | None, workflow: str | None, limit: int | None) -> Call[list[models.RunSummary]]:
    params = clean_params({"status": status, "workflow": workflow, "limit": limit})
    return Call("GET", "/v1/runs", _model(list[models.RunSummary]), params=params, retry_safe=True)


def cancel_run(run_id: str | uuid.UUID) -> Call[models.Run]:
    # Cancelling a finished or cancelled run changes nothing and returns it: safe to repeat.
    return Call("POST", f"/v1/runs/{id_str(run_id)}/cancel", _model(models.Run), retry_safe=True)


def tool_calls(run_id: str | uuid.UUID) -> Call[list[models.ToolCall]]:
    return Call("GET", f"/v1/runs/{id_str(run_id)}/tool-calls", _model(list[models.ToolCall]), retry_safe=True)


def envelopes(run_id: str | uuid.UUID) -> Call[list[models.Envelope]]:
    return Call("GET", f"/v1/runs/{id_str(run_id)}/envelopes", _model(list[models.Envelope]), retry_safe=True)


def event_page(
    after: int | None, run_id: str | uuid.UUID | None, workflow: str | None, type: str | None, limit: int | None
) -> Call[models.EventPage]:
    params = clean_params({"after": after, "run_id": run_id, "workflow": workflow, "type": type, "limit": limit})
    return Call("GET", "/v1/events", _model(models.EventPage), params=params,
                headers={"Accept": "application/json"}, retry_safe=True)  # fmt: skip


def event_ticket() -> Call[models.EventTicket]:
    # A fresh ticket per call; an extra one after a retry expires unused within a minute.
    return Call("POST", "/v1/events/tickets", _model(models.EventTicket), retry_safe=True)


def list_workers() -> Call[list[models.Worker]]:
    return Call("GET", "/v1/workers", _model(list[models.Worker]), retry_safe=True)


def ready() -> Call[models.Ready]:
    # 503 carries the same body (which of Postgres/NATS is missing): parsed, not raised, not retried.
    return Call("GET", "/readyz", _model(models.Ready), accept=frozenset({503}))


def audit_verify() -> Call[models.AuditVerification]:
    return Call("GET", "/v1/audit/verify", _model(models.AuditVerification), retry_safe=True)


def audit_list(
    run: str | uuid.UUID | None,
    action: str | None,
    actor: str | None,
    since: datetime | None,
    until: datetime | None,
    after: int | None,
    limit: int | None,
) -> Call[models.AuditPage]:
    params = clean_params(
        {"run": run, "action": action, "actor": actor, "since": since, "until": until, "after": after, "limit": limit}
    )
    return Call("GET", "/v1/audit", _model(models.AuditPage), params=params, retry_safe=True)


def get_costs(
    period: str | None, group_by: str | None, workflow: str | None, run: str | uuid.UUID | None
) -> Call[models.Costs]:
    params = clean_params({"period": period, "group_by": group_by, "workflow": workflow, "run": run})
    return Call("GET", "/v1/costs", _model(models.Costs), params=params, retry_safe=True)


def calibration(last: int | None) -> Call[models.Calibration]:
    return Call("GET", "/v1/costs/calibration", _model(models.Calibration),
                params=clean_params({"last": last}), retry_safe=True)  # fmt: skip


def list_budgets() -> Call[list[models.Budget]]:
    return Call("GET", "/v1/budgets", _model(list[models.Budget]), retry_safe=True)


def get_budget(name: str) -> Call[models.Budget]:
    return Call("GET", f"/v1/budgets/{id_str(name)}", _model(models.Budget), retry_safe=True)


def put_budget(
    name: str,
    scope: str,
    period: str,
    target: str | None,
    limit_usd: Decimal | float | str | None,
    limit_tokens: int | None,
    enforcement: str | None,
) -> Call[models.Budget]:
    body: dict[str, Any] = {"scope": scope, "period": period}
    optional = {"target": target, "limit_usd": limit_usd, "limit_tokens": limit_tokens, "enforcement": enforcement}
    body |= {k: json_ready(v) for k, v in optional.items() if v is not None}
    return Call("PUT", f"/v1/budgets/{id_str(name)}", _model(models.Budget), json=body, retry_safe=True)


def delete_budget(name: str) -> Call[None]:
    return Call("DELETE", f"/v1/budgets/{id_str(name)}", _none, retry_safe=True)


# --- retries --------------------------------------------------------------------------------

RETRY_STATUSES: Final = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = DEFAULT_MAX_RETRIES
    #: first backoff in seconds, doubled per attempt, capped at ``max_backoff``
    backoff: float = 0.5
    max_backoff: float = 8.0
    #: a ``Retry-After`` longer than this is not waited for: the error is raised at once
    max_retry_after: float = 60.0

    def backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: between half and all of ``backoff * 2**attempt``,
        so clients that failed together do not come back together."""
        ceiling = min(self.max_backoff, self.backoff * 2.0**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def after_response(self, call: Call[Any], response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        if attempt >= self.max_retries or not call.retry_safe or response.status_code not in RETRY_STATUSES:
            return None
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is None:
            return self.backoff_delay(attempt)
        return retry_after if retry_after <= self.max_retry_after else None

    def after_exception(self, call: Call[Any], exc: httpx.HTTPError, attempt: int) -> float | None:
        if attempt >= self.max_retries:
            return None
        # Nothing reached the server when the connection could not even be made: safe for any request.
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return self.backoff_delay(attempt)
        if call.retry_safe and isinstance(exc, httpx.TransportError):
            return self.backoff_delay(attempt)
        return None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


# --- errors ---------------------------------------------------------------------------------

_BY_CODE: Final[dict[str, type[errors.APIError]]] = {
    cls.code: cls
    for cls in (
        errors.ValidationFailed, errors.CanonicalizationError, errors.EnvelopeRejected, errors.NotFound,
        errors.Unauthorized, errors.Forbidden, errors.Conflict, errors.CursorExpired, errors.BudgetExceeded,
        errors.PayloadTooLarge, errors.RateLimited, errors.Unavailable,
    )
}  # fmt: skip
_BY_STATUS: Final[dict[int, type[errors.APIError]]] = {
    401: errors.Unauthorized, 402: errors.BudgetExceeded, 403: errors.Forbidden, 404: errors.NotFound,
    409: errors.Conflict, 410: errors.CursorExpired, 413: errors.PayloadTooLarge, 422: errors.ValidationFailed,
    429: errors.RateLimited, 503: errors.Unavailable,
}  # fmt: skip


def error_from_response(response: httpx.Response) -> errors.APIError:
    """The most specific class for a failed response: by ``code`` when the class's status
    agrees, else by status, else :class:`APIError` itself."""
    status = response.status_code
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = response.text
    code: str | None = None
    detail: str | None = None
    details: Any = None
    if isinstance(body, Mapping):
        code = body.get("code") if isinstance(body.get("code"), str) else None
        raw_detail = body.get("detail")
        detail = raw_detail if isinstance(raw_detail, str) else (None if raw_detail is None else str(raw_detail))
        details = body.get("errors")
    if detail is None:
        detail = (body.strip()[:500] if isinstance(body, str) and body.strip() else None) or response.reason_phrase
    cls = _BY_CODE.get(code or "")
    if cls is None or cls.status_code != status:
        cls = _BY_STATUS.get(status, errors.APIError)
    code = code or cls.code if cls is not errors.APIError else code or f"http_{status}"
    request = response.request
    message = f"{detail} (HTTP {status} {code}; {request.method} {request.url.path})"
    if isinstance(details, list) and details and all(isinstance(e, Mapping) for e in details):
        fields = "; ".join(f"{e.get('loc', '?')}: {e.get('msg', '?')}" for e in details[:5])
        message += f": {fields}"
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return cls(message, details=details, status=status, code=code, detail=detail, response_body=body,
               headers={k.lower(): v for k, v in response.headers.items()}, retry_after=retry_after)  # fmt: skip


def transport_error(exc: httpx.HTTPError, method: str, url: str) -> errors.TransportError:
    what = f"{method} {url}"
    if isinstance(exc, httpx.TimeoutException):
        return errors.RequestTimeout(f"{what}: timed out ({type(exc).__name__})")
    reason = str(exc) or type(exc).__name__
    return errors.TransportError(f"{what}: {reason}")


class StreamUnsupported(errors.APIError):
    """The server does not serve event streams here (an older control plane, or a proxy
    answering in its place): ``runs.wait`` falls back to polling."""

    code = "stream_unsupported"


def check_stream_response(response: httpx.Response, run_known: bool) -> None:
    """Raise for an event-stream response that is not one (call after reading an error body)."""
    status = response.status_code
    if status in (405, 406, 501) or (status == 404 and run_known):
        raise StreamUnsupported(f"no event stream at {response.request.url.path} (HTTP {status})", status=status)
    if status >= 400:
        raise error_from_response(response)
    content_type = response.headers.get("Content-Type", "")
    if not content_type.startswith("text/event-stream"):
        raise StreamUnsupported(
            f"{response.request.url.path} answered {content_type or 'no content type'}, not text/event-stream",
            status=status,
        )


# --- Server-Sent Events ---------------------------------------------------------------------


@dataclass
class SSEMessage:
    event: str = "message"
    data: str = ""
    id: str | None = None


class SSEDecoder:
    """The event-stream format (WHATWG HTML 9.2.6), fed one line at a time."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> SSEMessage | None:
        """A complete message when ``line`` is the blank line ending one, else None."""
        if not line:
            if not self._data:
                self._event = ""
                return None
            message = SSEMessage(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return message
        if line.startswith(":"):
            return None  # a comment: the server's keepalive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def event_from(message: SSEMessage) -> models.Event | None:
    """The API event in an SSE message; None for messages that carry none."""
    if not message.data.strip():
        return None
    try:
        return models.Event.model_validate_json(message.data)
    except ValueError as exc:
        raise errors.APIError(f"malformed event in the stream: {exc}", status=200, code="malformed_event") from exc


#: ``event: error`` codes after which the stream resumes from the last cursor
RESUMABLE_STREAM_ERRORS: Final = frozenset({"slow_consumer", "going_away"})


def error_event(message: SSEMessage) -> errors.AgentFlowError | None:
    """An ``event: error`` message (the server ending the stream for a reason): a
    :class:`TransportError` to reconnect after (slow consumer, shutdown), or the APIError to raise."""
    if message.event != "error":
        return None
    try:
        body = json.loads(message.data)
    except ValueError:
        body = {"detail": message.data}
    if not isinstance(body, Mapping):
        body = {"detail": str(body)}
    code = str(body.get("code") or "stream_error")
    detail = str(body.get("detail") or code)
    if code in RESUMABLE_STREAM_ERRORS or "resume_after" in body:
        return errors.TransportError(f"the server ended the event stream: {detail} ({code})")
    status = int(body.get("status") or 500)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, errors.APIError)
    return cls(f"event stream ended: {detail} ({code})", status=status, code=code, detail=detail, response_body=body)
