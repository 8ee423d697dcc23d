"""The http agent against a real local HTTP server (127.0.0.1, a thread of this process)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.agents.http import HTTP_AGENTS, HttpAgent, _retry_after, close_client
from agentflow_worker.secrets import MissingSecret, SecretStore
from agentflow_worker.services import WorkerServices

SECRET = "s3cr3t-token-value-0123456789"


@dataclass
class Reply:
    status: int = 200
    body: bytes | Callable[[dict[str, Any]], bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: stream this many bytes in 64 KiB chunks, without Content-Length
    stream_bytes: int = 0


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


class Server:
    """Scripted replies per path (a queue; the last reply repeats) and a log of requests."""

    def __init__(self) -> None:
        self.script: dict[str, deque[Reply]] = {}
        self.seen: list[Seen] = []
        self.completed_streams = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def handle_any(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()), body)
                with server.lock:
                    server.seen.append(seen)
                    queue = server.script.get(parts.path)
                    reply = (queue.popleft() if len(queue) > 1 else queue[0]) if queue else Reply(404, b"no script")
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if reply.stream_bytes:
                        self.end_headers()
                        chunk = b"x" * 65536
                        for _ in range(reply.stream_bytes // len(chunk)):
                            self.wfile.write(chunk)
                        with server.lock:
                            server.completed_streams += 1
                        return
                    data = reply.body(seen.__dict__) if callable(reply.body) else reply.body
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def on(self, path: str, *replies: Reply) -> None:
        with self.lock:
            self.script[path] = deque(replies)

    def hits(self, path: str) -> int:
        with self.lock:
            return sum(1 for s in self.seen if s.path == path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def json_reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def echo(seen: dict[str, Any]) -> bytes:
    return json.dumps(
        {"headers": seen["headers"], "body": seen["body"].decode(), "query": seen["query"], "path": seen["path"]}
    ).encode()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
async def services() -> AsyncIterator[WorkerServices]:
    # a fresh worker per test: its own client and breakers
    svc = WorkerServices(secrets=SecretStore(environ={"AGENTFLOW_SECRET_API_TOKEN": SECRET}))
    yield svc
    await close_client(svc)


def step(services: WorkerServices, config: dict[str, Any], data: Any = None, tenant: str = "acme") -> StepContext:
    return StepContext(tenant, "run1", "call", 1, 1, 1, "caller", config, {"input": data, "last": None}, [], services)


def base(server: Server, path: str, **extra: Any) -> dict[str, Any]:
    return {"url": server.url(path), "allowed_hosts": [f"127.0.0.1:{server.port}"], "backoff_ms": 10, **extra}


AGENT = HTTP_AGENTS["http"]


async def test_get_json_with_templated_url_and_query(server: Server, services: WorkerServices) -> None:
    server.on("/users/a%2Fb", json_reply({"id": 7, "tags": ["x"]}, headers={"Set-Cookie": "session=1", "ETag": '"v1"'}))
    config = base(server, "/users/{input.id}", query={"q": "{input.q}", "lit": "1"}, headers={"X-Who": "{name}"})
    out = await AGENT.run(step(services, config, {"id": "a/b", "q": "x&y=1", "name": "ada"}))
    assert out == {
        "status": 200,
        "headers": {"content-type": "application/json", "content-length": "24", "etag": '"v1"'},
        "body": {"id": 7, "tags": ["x"]},
    }
    seen = server.seen[-1]
    assert seen.method == "GET" and seen.body == b""
    assert seen.query == {"q": ["x&y=1"], "lit": ["1"]}  # one value: the & was encoded, not a separator
    assert seen.headers["X-Who"] == "ada"


async def test_text_body_and_post_sends_input_as_json(server: Server, services: WorkerServices) -> None:
    server.on("/echo", Reply(200, echo, {"Content-Type": "text/plain; charset=utf-8"}))
    out = await AGENT.run(step(services, base(server, "/echo", method="POST"), {"order": 1, "name": "Zoë"}))
    assert out["status"] == 200 and isinstance(out["body"], str)
    sent = json.loads(out["body"])
    assert json.loads(sent["body"]) == {"order": 1, "name": "Zoë"}
    assert sent["headers"]["Content-Type"] == "application/json"

    config = base(server, "/echo", method="PUT", body={"n": "{input.n}", "msg": "n={input.n}"})
    out = await AGENT.run(step(services, config, {"n": 3}))
    assert json.loads(json.loads(out["body"])["body"]) == {"n": 3, "msg": "n=3"}


async def test_unknown_charset_and_head(server: Server, services: WorkerServices) -> None:
    server.on("/odd", Reply(200, "héllo".encode(), {"Content-Type": "text/plain; charset=klingon"}))
    assert (await AGENT.run(step(services, base(server, "/odd"))))["body"] == "héllo"
    out = await AGENT.run(step(services, base(server, "/odd", method="HEAD")))
    assert out["status"] == 200 and out["body"] is None
    assert server.seen[-1].method == "HEAD"


async def test_retries_5xx_then_succeeds(server: Server, services: WorkerServices) -> None:
    server.on("/flaky", Reply(500, b"oops"), Reply(502, b"oops"), json_reply({"ok": True}))
    out = await AGENT.run(step(services, base(server, "/flaky", retries=2)))
    assert out["body"] == {"ok": True}
    assert server.hits("/flaky") == 3


async def test_5xx_after_retries_fails_with_status_and_excerpt(server: Server, services: WorkerServices) -> None:
    server.on("/broken", Reply(503, b"maintenance " + b"y" * 2000))
    with pytest.raises(AgentError) as info:
        await AGENT.run(step(services, base(server, "/broken", retries=1)))
    message = str(info.value)
    assert f"GET http://127.0.0.1:{server.port}/broken returned status 503: maintenance yyy" in message
    assert len(message) < 700  # an excerpt, not the whole body
    assert server.hits("/broken") == 2


async def test_status_outside_fail_on_status_is_an_output(server: Server, services: WorkerServices) -> None:
    server.on("/missing", json_reply({"error": "nope"}, 404))
    out = await AGENT.run(step(services, base(server, "/missing", fail_on_status=[500])))
    assert out["status"] == 404 and out["body"] == {"error": "nope"}
    assert server.hits("/missing") == 1  # 4xx is not retried


async def test_429_honours_retry_after(server: Server, services: WorkerServices) -> None:
    server.on("/limited", Reply(429, b"slow down", {"Retry-After": "1"}), json_reply({"ok": 1}))
    started = time.monotonic()
    out = await AGENT.run(step(services, base(server, "/limited", retries=1)))
    elapsed = time.monotonic() - started
    assert out["body"] == {"ok": 1}
    assert elapsed >= 0.95, elapsed  # backoff_ms=10 alone would have retried at once
    assert server.hits("/limited") == 2


def test_retry_after_forms() -> None:
    assert _retry_after("3") == 3.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert _retry_after("soon") is None and _retry_after(None) is None


async def test_retry_after_is_capped(server: Server, services: WorkerServices) -> None:
    agent = HttpAgent(max_retry_after_s=0.2)
    server.on("/very-limited", Reply(429, b"", {"Retry-After": "3600"}), json_reply({"ok": 1}))
    started = time.monotonic()
    out = await agent.run(step(services, base(server, "/very-limited", retries=1)))
    assert out["status"] == 200
    assert time.monotonic() - started < 2


async def test_response_cap_stops_reading(server: Server, services: WorkerServices) -> None:
    server.on("/declared", Reply(200, b"z" * 5000))
    with pytest.raises(AgentError, match="response larger than 1000 bytes"):
        await AGENT.run(step(services, base(server, "/declared", max_response_bytes=1000)))

    before = server.completed_streams
    server.on("/stream", Reply(200, stream_bytes=64 * 1024 * 1024))
    with pytest.raises(AgentError, match="response larger than 100000 bytes"):
        await AGENT.run(step(services, base(server, "/stream", max_response_bytes=100_000)))
    await asyncio.sleep(0.5)
    # the client hung up long before 64 MiB, so the server never finished writing
    assert server.completed_streams == before


async def test_request_cap_refuses_before_sending(server: Server, services: WorkerServices) -> None:
    server.on("/upload", json_reply({}))
    with pytest.raises(AgentError, match=r"request body is 1[0-9] bytes, more than max_request_bytes=10"):
        await AGENT.run(step(services, base(server, "/upload", method="POST", max_request_bytes=10), {"k": "x" * 5}))
    assert server.hits("/upload") == 0


async def test_slow_server_times_out(server: Server, services: WorkerServices) -> None:
    server.on("/slow", Reply(200, b"late", delay_s=3))
    started = time.monotonic()
    with pytest.raises(AgentError, match=r"/slow timed out after 1 attempt\(s\)"):
        await AGENT.run(step(services, base(server, "/slow", timeout_s=0.5, retries=0)))
    assert time.monotonic() - started < 2


async def test_connection_refused_is_retried_then_reported(services: WorkerServices) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"url": f"http://127.0.0.1:{port}/", "allowed_hosts": ["127.0.0.1"], "retries": 1, "backoff_ms": 10}
    with pytest.raises(AgentError, match=r"failed after 2 attempt\(s\): ConnectError"):
        await AGENT.run(step(services, config))


@pytest.mark.parametrize(
    ("url", "allowed", "message"),
    [
        ("http://127.0.0.1:{port}/x", ["example.com"], "host '127.0.0.1:{port}' is not in allowed_hosts [example.com]"),
        ("http://127.0.0.1:{port}/x", ["127.0.0.1:1"], "not in allowed_hosts [127.0.0.1:1]"),
        ("http://localhost:{port}/x", ["*.localhost"], "host 'localhost:{port}' is not in allowed_hosts"),
        ("ftp://127.0.0.1:{port}/x", ["127.0.0.1"], "scheme 'ftp' is not allowed"),
        ("file:///etc/passwd", ["127.0.0.1"], "scheme 'file' is not allowed"),
        ("http://example.com@127.0.0.1:{port}/x", ["example.com"], "host '127.0.0.1:{port}'"),
    ],
)
async def test_disallowed_hosts_are_refused_before_connecting(
    server: Server, services: WorkerServices, url: str, allowed: list[str], message: str
) -> None:
    server.on("/x", json_reply({}))
    before = len(server.seen)
    with pytest.raises(AgentError) as info:
        await AGENT.run(step(services, {"url": url.format(port=server.port), "allowed_hosts": allowed}))
    assert message.format(port=server.port) in str(info.value)
    assert len(server.seen) == before


async def test_input_cannot_change_the_host(server: Server, services: WorkerServices) -> None:
    server.on("/evil.com", json_reply({}))
    config = {"url": "http://127.0.0.1:{input.port}/x", "allowed_hosts": ["127.0.0.1"]}
    with pytest.raises(AgentError, match="is not a valid URL"):
        await AGENT.run(step(services, config, {"port": f"{server.port}@evil.com"}))
    config = base(server, "/{input.p}")
    with pytest.raises(AgentError, match="status 404"):
        await AGENT.run(step(services, config, {"p": "../evil.com"}))
    assert server.seen[-1].path == "/..%2Fevil.com"


async def test_secret_header_reaches_server_but_never_the_output(server: Server, services: WorkerServices) -> None:
    server.on("/echo-secret", Reply(200, echo, {"Content-Type": "application/json"}))
    config = base(server, "/echo-secret", secret_headers={"Authorization": "API_TOKEN"})
    out = await AGENT.run(step(services, config))
    assert server.seen[-1].headers["Authorization"] == SECRET
    assert SECRET not in json.dumps(out)
    assert out["body"]["headers"]["Authorization"] == "[redacted]"

    server.on("/echo-secret-fail", Reply(401, echo))
    with pytest.raises(AgentError) as info:
        await AGENT.run(step(services, base(server, "/echo-secret-fail", secret_headers={"X-Key": "API_TOKEN"})))
    assert "status 401" in str(info.value) and "[redacted]" in str(info.value)
    assert SECRET not in str(info.value)


async def test_bad_headers_are_refused_before_sending(server: Server, services: WorkerServices) -> None:
    before = len(server.seen)
    with pytest.raises(AgentError, match="'Bad Name' is not a valid header name"):
        await AGENT.run(step(services, base(server, "/x", headers={"Bad Name": "v"})))
    with pytest.raises(AgentError, match="header 'X-Note' contains a line break"):
        await AGENT.run(step(services, base(server, "/x", headers={"X-Note": "{input.n}"}), {"n": "a\r\nX-Admin: 1"}))
    assert len(server.seen) == before


async def test_missing_secret_propagates_its_message(server: Server, services: WorkerServices) -> None:
    before = len(server.seen)
    with pytest.raises(MissingSecret, match="secret 'NOPE' is not configured for tenant 'acme'"):
        await AGENT.run(step(services, base(server, "/x", secret_headers={"X-Key": "NOPE"})))
    assert len(server.seen) == before


async def test_redirects_are_checked_against_the_allowlist(server: Server, services: WorkerServices) -> None:
    server.on("/target", json_reply({"landed": True}))
    server.on("/hop", Reply(302, b"", {"Location": "/target"}))
    server.on("/away", Reply(302, b"", {"Location": f"http://localhost:{server.port}/target"}))
    out = await AGENT.run(step(services, base(server, "/hop")))
    assert out["status"] == 302 and out["headers"]["location"] == "/target"  # not followed by default
    out = await AGENT.run(step(services, base(server, "/hop", follow_redirects=True)))
    assert out["body"] == {"landed": True}
    hits = server.hits("/target")
    with pytest.raises(AgentError, match=f"redirect to host 'localhost:{server.port}' is not in allowed_hosts"):
        await AGENT.run(step(services, base(server, "/away", follow_redirects=True)))
    assert server.hits("/target") == hits


async def test_invalid_settings_name_the_field(services: WorkerServices) -> None:
    with pytest.raises(AgentError, match=r"agent 'caller' has invalid settings: allowed_hosts.*at least 1"):
        await AGENT.run(step(services, {"url": "http://x", "allowed_hosts": []}))
    with pytest.raises(AgentError, match="allowed_hosts: Value error, 'http://x' is not a host name"):
        await AGENT.run(step(services, {"url": "http://x", "allowed_hosts": ["http://x"]}))


async def test_circuit_breaker_opens_fails_fast_and_probes(server: Server, services: WorkerServices) -> None:
    agent = HttpAgent(failure_threshold=3, cooldown_s=0.5)
    server.on("/down", Reply(503, b"down"))
    config = base(server, "/down", retries=0)
    for _ in range(3):
        with pytest.raises(AgentError, match="returned status 503"):
            await agent.run(step(services, config))
    assert server.hits("/down") == 3

    # open: every step of this worker fails fast, whatever the path on that host
    for path in ("/down", "/other"):
        with pytest.raises(AgentError) as info:
            await agent.run(step(services, base(server, path, retries=0)))
        assert str(info.value).startswith(
            f"circuit open for host 127.0.0.1:{server.port} after 3 consecutive failures; next probe in"
        )
    assert server.hits("/down") == 3 and server.hits("/other") == 0

    # after the cooldown one probe goes through; it fails, so the breaker opens again
    await asyncio.sleep(0.6)
    with pytest.raises(AgentError, match="returned status 503"):
        await agent.run(step(services, config))
    assert server.hits("/down") == 4
    with pytest.raises(AgentError, match=r"circuit open .* after 4 consecutive failures"):
        await agent.run(step(services, config))
    assert server.hits("/down") == 4

    # the host recovers: the next probe succeeds and closes the breaker
    server.on("/down", json_reply({"up": True}))
    await asyncio.sleep(0.6)
    assert (await agent.run(step(services, config)))["body"] == {"up": True}
    assert (await agent.run(step(services, config)))["body"] == {"up": True}
    assert server.hits("/down") == 6


async def test_half_open_admits_one_concurrent_probe(server: Server, services: WorkerServices) -> None:
    agent = HttpAgent(failure_threshold=1, cooldown_s=0.3)
    server.on("/probe", Reply(500, b"x"))
    with pytest.raises(AgentError, match="status 500"):
        await agent.run(step(services, base(server, "/probe", retries=0)))
    server.on("/probe", Reply(200, b"ok", delay_s=0.3))
    await asyncio.sleep(0.35)
    results = await asyncio.gather(
        *(agent.run(step(services, base(server, "/probe", retries=0))) for _ in range(4)), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, AgentError)]
    assert len(ok) == 1 and ok[0]["body"] == "ok"
    assert len(refused) == 3 and all("a probe request is in flight" in str(r) for r in refused)
    assert server.hits("/probe") == 2


async def test_breaker_is_shared_per_worker_not_per_agent(server: Server) -> None:
    one, two = WorkerServices(), WorkerServices()
    try:
        agent = HttpAgent(failure_threshold=1, cooldown_s=30)
        server.on("/shared", Reply(500, b"x"))
        with pytest.raises(AgentError, match="status 500"):
            await agent.run(step(one, base(server, "/shared", retries=0)))
        with pytest.raises(AgentError, match="circuit open"):
            await HttpAgent().run(step(one, base(server, "/shared", retries=0)))
        # another worker has its own breakers
        with pytest.raises(AgentError, match="status 500"):
            await agent.run(step(two, base(server, "/shared", retries=0)))
    finally:
        await close_client(one)
        await close_client(two)
