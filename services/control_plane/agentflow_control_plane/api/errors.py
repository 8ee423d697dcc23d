"""The one place where errors become HTTP responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentflow_core.errors import AgentFlowError

log = logging.getLogger("agentflow.api")


def _loc(parts: tuple[int | str, ...] | list[int | str]) -> str:
    # FastAPI prefixes "body"/"query"/"header"; keep it, users see where the field lives.
    return ".".join(str(p) for p in parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AgentFlowError)
    async def _agentflow_error(request: Request, exc: AgentFlowError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        if exc.status_code in (401, 403):
            state = getattr(request.app.state, "agentflow", None)
            if state is not None and state.auth_failures is not None:
                state.auth_failures.note(
                    tenant=getattr(request.state, "tenant", None) if exc.status_code == 403 else None,
                    status=exc.status_code, reason=exc.message,
                    client=request.client.host if request.client else "?", path=request.url.path,
                )  # fmt: skip
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": _loc(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return JSONResponse(
            {"code": "validation_failed", "detail": "invalid request", "errors": errors},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"code": code, "detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"code": "internal", "detail": "internal error"}, status_code=500)
