"""The one error hierarchy of AgentFlow.

Every error the platform raises on purpose derives from :class:`AgentFlowError`. Each
class carries an HTTP status and a stable machine-readable ``code``; the control plane
maps the hierarchy to HTTP responses in exactly one place
(``agentflow_control_plane.api.errors``)::

    AgentFlowError                      500 internal
    ├── ValidationFailed                422 validation_failed   (spec, input, canonical form)
    │   └── CanonicalizationError       422 not_canonicalizable (NaN, Infinity, |int| >= 2**53)
    ├── NotFound                        404 not_found
    ├── Unauthorized                    401 unauthorized
    ├── Forbidden                       403 forbidden
    ├── Conflict                        409 conflict
    ├── PayloadTooLarge                 413 payload_too_large
    ├── BudgetExceeded                  402 budget_exceeded     (a hard budget cannot take a new run)
    ├── EnvelopeRejected                422 envelope_rejected   (hash mismatch, malformed)
    ├── Unavailable                     503 unavailable         (dependencies not reachable yet)
    └── ConfigurationError              500 configuration       (refuses to start)
"""

from __future__ import annotations

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


class ValidationFailed(AgentFlowError):
    status_code = 422
    code = "validation_failed"


class CanonicalizationError(ValidationFailed):
    code = "not_canonicalizable"


class NotFound(AgentFlowError):
    status_code = 404
    code = "not_found"


class Unauthorized(AgentFlowError):
    status_code = 401
    code = "unauthorized"


class Forbidden(AgentFlowError):
    status_code = 403
    code = "forbidden"


class Conflict(AgentFlowError):
    status_code = 409
    code = "conflict"


class BudgetExceeded(AgentFlowError):
    status_code = 402
    code = "budget_exceeded"


class PayloadTooLarge(AgentFlowError):
    status_code = 413
    code = "payload_too_large"


class EnvelopeRejected(AgentFlowError):
    status_code = 422
    code = "envelope_rejected"


class Unavailable(AgentFlowError):
    status_code = 503
    code = "unavailable"


class ConfigurationError(AgentFlowError):
    code = "configuration"
