"""The one error hierarchy of AgentFlow.

Every error the platform raises on purpose derives from :class:`AgentFlowError`. Each
class carries an HTTP status and a stable machine-readable ``code``; the control plane
maps the hierarchy to HTTP responses in exactly one place
(``agentflow_control_plane.api.errors``), and the SDK (``agentflow_core.client``) maps
responses back to the same classes, so ``except NotFound`` reads the same on both sides::

    AgentFlowError                      500 internal
    ├── APIError                        (any status)            an HTTP error: .status, .code, .detail, .errors
    │   ├── ValidationFailed            422 validation_failed   (spec, input, canonical form)
    │   │   └── CanonicalizationError   422 not_canonicalizable (NaN, Infinity, |int| >= 2**53)
    │   ├── EnvelopeRejected            422 envelope_rejected   (hash mismatch, malformed)
    │   ├── NotFound                    404 not_found
    │   ├── Unauthorized                401 unauthorized
    │   ├── Forbidden                   403 forbidden
    │   ├── Conflict                    409 conflict
    │   ├── CursorExpired               410 cursor_expired      (an event cursor older than retention)
    │   ├── PayloadTooLarge             413 payload_too_large
    │   ├── BudgetExceeded              402 budget_exceeded     (a hard budget cannot take a new run)
    │   ├── RateLimited                 429 rate_limited
    │   └── Unavailable                 503 unavailable         (dependencies not reachable yet)
    ├── ConfigurationError              500 configuration       (refuses to start)
    ├── TransportError                  (SDK) no HTTP response: connection refused/reset, DNS, timeouts
    │   └── RequestTimeout              (SDK) the request's own timeout ran out (also a TimeoutError)
    └── WaitTimeout                     (SDK) runs.wait() gave up before the run finished (also a TimeoutError)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class AgentFlowError(Exception):
    status_code: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "detail": self.message}
        if self.details is not None:
            body["errors"] = self.details
        return body


class APIError(AgentFlowError):
    """An error that is (or came from) an HTTP response.

    The server raises the subclasses with a message and optional ``details``; the SDK
    builds them from a response, passing ``status``/``code`` when they differ from the
    class's (e.g. a 500, or a code this version does not know) and the parsed body.
    """

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        response_body: Any = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, details=details)
        if status is not None:
            self.status_code = status
        if code is not None:
            self.code = code
        #: the server's ``detail``; ``message`` may add the status and code for display
        self.detail = detail if detail is not None else message
        #: the parsed JSON body (or the text when it was not JSON); None for server-raised errors
        self.response_body = response_body
        self.headers: dict[str, str] = dict(headers or {})
        #: seconds the server asked to wait (``Retry-After``), when it said
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self.status_code

    @property
    def errors(self) -> Any:
        """Per-field problems (``[{"loc", "msg"}]`` for 422) or structured details (402's numbers)."""
        return self.details


class ValidationFailed(APIError):
    status_code = 422
    code = "validation_failed"


class CanonicalizationError(ValidationFailed):
    code = "not_canonicalizable"


class NotFound(APIError):
    status_code = 404
    code = "not_found"


class Unauthorized(APIError):
    status_code = 401
    code = "unauthorized"


class Forbidden(APIError):
    status_code = 403
    code = "forbidden"


class Conflict(APIError):
    status_code = 409
    code = "conflict"


class CursorExpired(APIError):
    status_code = 410
    code = "cursor_expired"


class BudgetExceeded(APIError):
    status_code = 402
    code = "budget_exceeded"


class PayloadTooLarge(APIError):
    status_code = 413
    code = "payload_too_large"


class EnvelopeRejected(APIError):
    status_code = 422
    code = "envelope_rejected"


class RateLimited(APIError):
    status_code = 429
    code = "rate_limited"


class Unavailable(APIError):
    status_code = 503
    code = "unavailable"


class ConfigurationError(AgentFlowError):
    code = "configuration"


class TransportError(AgentFlowError):
    """No HTTP response was received (connection refused or reset, DNS failure, timeout)."""

    code = "transport"


class RequestTimeout(TransportError, TimeoutError):
    """The request's timeout ran out before the response (or the next part of a stream) arrived."""

    code = "timeout"


class WaitTimeout(AgentFlowError, TimeoutError):
    """``runs.wait(timeout=...)`` ran out of time; the run itself goes on."""

    code = "wait_timeout"
