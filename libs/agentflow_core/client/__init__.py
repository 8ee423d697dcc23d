"""The Python SDK of AgentFlow: :class:`AgentFlowClient` and :class:`AsyncAgentFlowClient`.

Needs only httpx and pydantic (no FastAPI, SQLAlchemy, asyncpg or NATS)::

    from agentflow_core.client import AgentFlowClient

    with AgentFlowClient() as af:  # AGENTFLOW_URL, AGENTFLOW_TOKEN
        run = af.runs.create("hello", {"message": "hi"}, idempotency_key="order-42")
        print(af.runs.wait(run.id, timeout=60).output)

Errors are the platform's own hierarchy (:mod:`agentflow_core.errors`). See docs/sdk.md.
"""

from agentflow_core.client._async import AsyncAgentFlowClient
from agentflow_core.client._base import NOT_GIVEN, NotGiven, RetryPolicy, Timeout, parse_retry_after
from agentflow_core.client._sync import AgentFlowClient
from agentflow_core.client.models import *  # noqa: F403 - the resource models are part of the SDK's surface
from agentflow_core.client.models import __all__ as _models
from agentflow_core.errors import (
    AgentFlowError,
    APIError,
    BudgetExceeded,
    CanonicalizationError,
    Conflict,
    CursorExpired,
    EnvelopeRejected,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    TransportError,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
)

__all__ = [
    "NOT_GIVEN",
    "APIError",
    "AgentFlowClient",
    "AgentFlowError",
    "AsyncAgentFlowClient",
    "BudgetExceeded",
    "CanonicalizationError",
    "Conflict",
    "CursorExpired",
    "EnvelopeRejected",
    "Forbidden",
    "NotFound",
    "NotGiven",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "RetryPolicy",
    "Timeout",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "WaitTimeout",
    "parse_retry_after",
    *_models,
]
