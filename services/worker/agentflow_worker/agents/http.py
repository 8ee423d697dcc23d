"""The ``http`` agent: one HTTP request to an allowlisted host, with retries and a breaker.

What keeps it safe to hand to workflow authors:

* deny by default: the URL (after templating, and every redirect hop) must match
  ``allowed_hosts``, checked before any connection is made; only http and https;
* placeholder values are URL-quoted, so input data cannot change the host or path;
* secret headers are read from the worker's secret store by name and never appear in
  an error or in the output (a server echoing them back gets them redacted);
* bounded: request and response sizes (the response is counted while streaming and
  reading stops at the cap), per-attempt timeouts, capped Retry-After waits;
* one circuit breaker per host for the whole worker, so a dead host costs one fast
  failure per step instead of a full timeout per step.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import ValidationError

from agentflow_core.agent_configs.http import HttpAgentConfig
from agentflow_core.exec_profile import host_matches
from agentflow_worker.agents.base import AgentError, StepContext, config_error
from agentflow_worker.agents.circuit import BreakerRegistry, CircuitBreaker
from agentflow_worker.agents.templating import render, render_value, step_scope

_CLIENT_KEY = "http.client"
_BREAKERS_KEY = "http.circuit_breakers"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: response headers worth passing on; the rest (cookies above all) stay out of the output
_KEPT_HEADERS = ("content-type", "content-length", "location", "etag", "last-modified", "retry-after")
_EXCERPT = 500
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(slots=True)
class _Response:
    status: int
    headers: httpx.Headers
    content: bytes
    encoding: str | None


class _TooLarge(AgentError):
    pass


def _target(url: str, allowed: list[str], *, redirect: bool = False) -> tuple[httpx.URL, str]:
    """Parse ``url`` and check it against the allowlist; returns it and its ``host:port``."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise AgentError(f"http: url '{url}' is not a valid URL: {exc}") from exc
    if parsed.scheme not in _DEFAULT_PORTS:
        raise AgentError(f"http: url scheme '{parsed.scheme or '(none)'}' is not allowed (only http and https)")
    if not parsed.host:
        raise AgentError(f"http: url '{url}' has no host")
    host = f"{parsed.host}:{parsed.port or _DEFAULT_PORTS[parsed.scheme]}"
    if not any(host_matches(pattern, host) for pattern in allowed):
        what = "redirect to host" if redirect else "host"
        outcome = "not followed" if redirect else "nothing was sent"
        raise AgentError(f"http: {what} '{host}' is not in allowed_hosts [{', '.join(allowed)}]; {outcome}")
    return parsed, host


def _shown(url: httpx.URL) -> str:
    """The URL for messages: no credentials, no query (which may carry tokens)."""
    return str(url.copy_with(query=None, fragment=None, username=None, password=None))


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


def _redact(value: Any, secrets: list[str]) -> Any:
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[redacted]")
        return value
    if isinstance(value, dict):
        return {_redact(k, secrets): _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secrets) for v in value]
    return value


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class HttpAgent:
    """``http``: see the module docstring; settings in :class:`HttpAgentConfig`."""

    #: breaker settings shared by every host of the worker
    failure_threshold: int = CircuitBreaker.failure_threshold
    cooldown_s: float = CircuitBreaker.cooldown_s
    #: longest Retry-After honoured; a longer one is waited for this long
    max_retry_after_s: float = 60.0
    #: longest exponential backoff between attempts
    max_backoff_s: float = 30.0
    max_redirects: int = 10

    def __init__(
        self,
        *,
        failure_threshold: int | None = None,
        cooldown_s: float | None = None,
        max_retry_after_s: float | None = None,
    ) -> None:
        if failure_threshold is not None:
            self.failure_threshold = failure_threshold
        if cooldown_s is not None:
            self.cooldown_s = cooldown_s
        if max_retry_after_s is not None:
            self.max_retry_after_s = max_retry_after_s

    # -- shared per worker ---------------------------------------------------------------

    def _client(self, ctx: StepContext) -> httpx.AsyncClient:
        shared = ctx.svc.shared
        loop = asyncio.get_running_loop()
        entry = shared.get(_CLIENT_KEY)
        # A client's pool belongs to the loop that made it; a new loop (tests, a restart
        # of the worker's loop) gets a new client rather than a pool it cannot use.
        if entry is None or entry[0] is not loop or entry[1].is_closed:
            client = httpx.AsyncClient(
                follow_redirects=False,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
            shared[_CLIENT_KEY] = (loop, client)
            ctx.svc.closers.append(client.aclose)
            return client
        existing: httpx.AsyncClient = entry[1]
        return existing

    def _breakers(self, ctx: StepContext) -> BreakerRegistry:
        registry = ctx.svc.shared.get(_BREAKERS_KEY)
        if registry is None:
            registry = BreakerRegistry(failure_threshold=self.failure_threshold, cooldown_s=self.cooldown_s)
            ctx.svc.shared[_BREAKERS_KEY] = registry
        assert isinstance(registry, BreakerRegistry)
        return registry

    # -- the step ------------------------------------------------------------------------

    async def run(self, ctx: StepContext) -> Any:
        try:
            cfg = HttpAgentConfig.model_validate(ctx.config)
        except ValidationError as exc:
            raise AgentError(config_error(ctx.agent_name, exc)) from exc
        scope = step_scope(ctx)
        url, host = _target(render(cfg.url, scope, url_quote=True), cfg.allowed_hosts)
        # httpx encodes query values itself; quoting them here as well would double-encode.
        query = {name: render(value, scope) for name, value in cfg.query.items()}
        if query:
            url = url.copy_merge_params(query)

        headers: dict[str, str] = {}
        for name, template in cfg.headers.items():
            headers[name] = render(template, scope)
        secret_values: list[str] = []
        for name, secret in cfg.secret_headers.items():
            value = ctx.svc.secrets.get(ctx.tenant, secret)
            headers[name] = value
            if value:
                secret_values.append(value)
        for name, value in headers.items():
            if not _HEADER_NAME.match(name):
                raise AgentError(f"http: '{name}' is not a valid header name")
            if "\r" in value or "\n" in value or "\0" in value:
                # the value itself is not shown: it may be a secret
                raise AgentError(f"http: header '{name}' contains a line break or NUL")

        content = self._body(cfg, ctx, scope, headers)
        if content is not None and len(content) > cfg.max_request_bytes:
            raise AgentError(
                f"http: request body is {len(content)} bytes, more than max_request_bytes={cfg.max_request_bytes}"
            )

        method = cfg.method
        secret_names = {n.lower() for n in cfg.secret_headers}
        origin = host
        for _ in range(self.max_redirects + 1):
            response = await self._with_retries(ctx, cfg, method, url, host, headers, content)
            location = response.headers.get("location")
            if not (cfg.follow_redirects and response.status in _REDIRECTS and location):
                break
            url, host = _target(str(url.join(location)), cfg.allowed_hosts, redirect=True)
            if response.status == 303 or (response.status in (301, 302) and method not in ("GET", "HEAD")):
                method, content = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            if host != origin:
                # credentials are for the host they were configured for, not wherever it redirects
                headers = {k: v for k, v in headers.items() if k.lower() not in secret_names}
        else:
            raise AgentError(f"http: more than {self.max_redirects} redirects, last to {_shown(url)}")

        try:
            return _redact(self._output(cfg, method, url, response), secret_values)
        except AgentError as exc:
            # a server may echo the credentials back in an error page
            raise AgentError(_redact(str(exc), secret_values)) from None

    def _body(
        self, cfg: HttpAgentConfig, ctx: StepContext, scope: dict[str, Any], headers: dict[str, str]
    ) -> bytes | None:
        if cfg.body is not None:
            body = render_value(cfg.body, scope)
        elif cfg.method in ("POST", "PUT", "PATCH"):
            body = ctx.input
        else:
            return None
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
        if isinstance(body, str) and content_type is not None and not _is_json(content_type):
            # an explicit non-JSON content type with a string body: send the text as is
            return body.encode()
        if content_type is None:
            headers["Content-Type"] = "application/json"
        try:
            return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise AgentError(f"http: body is not JSON-serialisable: {exc}") from exc

    async def _with_retries(
        self,
        ctx: StepContext,
        cfg: HttpAgentConfig,
        method: str,
        url: httpx.URL,
        host: str,
        headers: dict[str, str],
        content: bytes | None,
    ) -> _Response:
        breaker = self._breakers(ctx).get(host)
        client = self._client(ctx)
        attempts = cfg.retries + 1
        for attempt in range(attempts):
            probe = breaker.acquire()
            try:
                response = await self._attempt(client, cfg, method, url, headers, content)
            except _TooLarge:
                breaker.record_success()  # the host answered; the answer was just too big
                raise
            except (httpx.TransportError, TimeoutError) as exc:
                breaker.record_failure()
                reason = "timed out" if isinstance(exc, TimeoutError | httpx.TimeoutException) else "failed"
                detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if attempt + 1 >= attempts:
                    raise AgentError(
                        f"http: {method} {_shown(url)} {reason} after {attempts} attempt(s): {detail}"
                    ) from exc
                await asyncio.sleep(self._backoff(cfg, attempt))
                continue
            except httpx.HTTPError as exc:
                # not the host's fault (e.g. an undecodable Content-Encoding): no verdict, no retry
                breaker.abandon(probe)
                raise AgentError(f"http: {method} {_shown(url)} failed: {type(exc).__name__}: {exc}") from exc
            except BaseException:
                breaker.abandon(probe)
                raise
            if response.status >= 500:
                breaker.record_failure()
            else:
                breaker.record_success()
            if (response.status == 429 or response.status >= 500) and attempt + 1 < attempts:
                wait = _retry_after(response.headers.get("retry-after"))
                if wait is None:
                    wait = self._backoff(cfg, attempt)
                await asyncio.sleep(min(wait, self.max_retry_after_s))
                continue
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, cfg: HttpAgentConfig, attempt: int) -> float:
        base = cfg.backoff_ms / 1000 * (2**attempt)
        # jitter keeps the workers that failed together from retrying together
        return float(min(self.max_backoff_s, base * random.uniform(0.75, 1.25)))

    async def _attempt(
        self,
        client: httpx.AsyncClient,
        cfg: HttpAgentConfig,
        method: str,
        url: httpx.URL,
        headers: dict[str, str],
        content: bytes | None,
    ) -> _Response:
        timeout = httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)
        request = client.build_request(method, url, headers=headers, content=content, timeout=timeout)
        # httpx's timeouts are per network operation; this bounds the whole exchange, so a
        # server dripping bytes slowly cannot hold the step past timeout_s.
        async with asyncio.timeout(cfg.timeout_s):
            response = await client.send(request, stream=True)
            try:
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cfg.max_response_bytes:
                    raise _TooLarge(
                        f"http: response larger than {cfg.max_response_bytes} bytes "
                        f"(Content-Length: {declared}) from {_shown(url)}"
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > cfg.max_response_bytes:
                        raise _TooLarge(f"http: response larger than {cfg.max_response_bytes} bytes from {_shown(url)}")
                    chunks.append(chunk)
            finally:
                await response.aclose()
        return _Response(response.status_code, response.headers, b"".join(chunks), response.charset_encoding)

    def _output(self, cfg: HttpAgentConfig, method: str, url: httpx.URL, response: _Response) -> dict[str, Any]:
        content_type = response.headers.get("content-type", "")
        try:
            text = response.content.decode(response.encoding or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know: read it as UTF-8 rather than fail
            text = response.content.decode("utf-8", errors="replace")
        if response.status in cfg.fail_on_status:
            excerpt = text[:_EXCERPT] + ("..." if len(text) > _EXCERPT else "")
            raise AgentError(f"http: {method} {_shown(url)} returned status {response.status}: {excerpt}")
        body: Any
        if method == "HEAD" or not response.content:
            body = None if _is_json(content_type) or method == "HEAD" else ""
        elif _is_json(content_type):
            try:
                body = json.loads(text)
            except ValueError as exc:
                raise AgentError(
                    f"http: {method} {_shown(url)} declared {content_type} but the body is not valid JSON: {exc}"
                ) from exc
        else:
            body = text
        return {
            "status": response.status,
            "headers": {k: response.headers[k] for k in _KEPT_HEADERS if k in response.headers},
            "body": body,
        }


async def close_client(services: Any) -> None:
    """Close the worker's shared HTTP client now (``WorkerServices.aclose`` does it at shutdown)."""
    entry = services.shared.pop(_CLIENT_KEY, None)
    if entry is not None:
        await entry[1].aclose()


HTTP_AGENTS: dict[str, Any] = {"http": HttpAgent()}
