"""A real local HTTP server speaking the OpenAI chat-completions API, with scripted answers.

The only simulated component the tests use: models cannot be reached from the test
machines. Bound to 127.0.0.1 on a free port; point an agent at it with ``api_base``.

Each request takes the next scripted reply. A reply is a dict of:

* ``content``: the answer text;
* ``tool_calls``: ``[{"name": "...", "arguments": {...} or "raw json", "id": optional}]``
  — the answer asks for these calls (``finish_reason: "tool_calls"``);
* ``usage``: ``{"prompt_tokens": n, "completion_tokens": m}`` reported instead of the
  counted one (otherwise tokens are counted, roughly four characters per token);
* ``status`` (+ ``headers``, ``message``): an HTTP error instead of an answer, e.g.
  ``{"status": 429, "headers": {"Retry-After": "1"}}``;
* ``model``: the reply only answers requests for that model (scripts for a primary
  model and its fallbacks can be interleaved);
* ``delay``: seconds to wait before answering (timeouts).

With the script exhausted, the last reply (for that model, else overall) repeats.
Requests with ``"stream": true`` get server-sent events of ``chat.completion.chunk``
objects, a final usage chunk when ``stream_options.include_usage`` is set, then
``data: [DONE]``. Requests are recorded for assertions.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _tokens(text: str) -> int:
    # Roughly four characters per token, like English text through a BPE tokenizer.
    return max(1, len(text) // 4)


def _prompt_tokens(body: dict[str, Any]) -> int:
    # Per message: its text plus a few tokens of role/framing overhead, as real servers count.
    total = 0
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        text = str(content or "")
        if message.get("tool_calls"):
            text += json.dumps(message["tool_calls"])
        total += 3 + (_tokens(text) if text else 0)
    if body.get("tools"):
        total += _tokens(json.dumps(body["tools"]))
    return max(1, total)


def _tool_calls(reply: dict[str, Any], request_no: int) -> list[dict[str, Any]]:
    calls = []
    for i, call in enumerate(reply.get("tool_calls") or []):
        arguments = call.get("arguments", {})
        calls.append(
            {
                "id": call.get("id") or f"call_{request_no}_{i}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
        )
    return calls


def _pieces(text: str) -> list[str]:
    # Word-sized deltas, whitespace attached, like a real tokenizer-driven stream.
    return re.findall(r"\s*\S+|\s+", text) or [""]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is a scripted situation, not a server bug.
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._script: deque[dict[str, Any]] = deque()
        self._last: dict[str, Any] = {"content": "{}"}
        self._last_by_model: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                reply, request_no = fake._next(body, dict(self.headers))
                if reply.get("delay"):
                    time.sleep(float(reply["delay"]))
                status = int(reply.get("status", 200))
                if status != 200:
                    error = reply.get("message", "scripted error")
                    self._send(status, {"error": {"message": error}}, reply.get("headers", {}))
                    return
                content = reply.get("content")
                calls = _tool_calls(reply, request_no)
                if content is None and not calls:
                    content = ""
                completion_text = (content or "") + "".join(
                    c["function"]["name"] + c["function"]["arguments"] for c in calls
                )
                usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": _tokens(completion_text)}
                usage.update(reply.get("usage") or {})
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                ident = f"chatcmpl-{request_no}"
                model = body.get("model", "fake")
                finish = "tool_calls" if calls else "stop"
                if body.get("stream"):
                    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                    self._stream(ident, model, content, calls, finish, usage if include_usage else None)
                    return
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                self._send(
                    200,
                    {
                        "id": ident,
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": model,
                        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                        "usage": usage,
                    },
                )

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _stream(
                self,
                ident: str,
                model: str,
                content: str | None,
                calls: list[dict[str, Any]],
                finish: str,
                usage: dict[str, int] | None,
            ) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                created = int(time.time())

                def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
                    return {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                    }

                events: list[dict[str, Any]] = [chunk({"role": "assistant", "content": ""})]
                if content:
                    events += [chunk({"content": piece}) for piece in _pieces(content)]
                for index, call in enumerate(calls):
                    arguments = call["function"]["arguments"]
                    head = {
                        "index": index,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""},
                    }
                    events.append(chunk({"tool_calls": [head]}))
                    half = len(arguments) // 2
                    for part in (arguments[:half], arguments[half:]):
                        if part:
                            events.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]}))
                events.append(chunk({}, finish))
                if usage is not None:
                    events.append(
                        {
                            "id": ident,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage,
                        }
                    )
                for event in events:
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *replies: dict[str, Any]) -> None:
        with self._lock:
            self._script.extend(replies)

    def models_requested(self) -> list[str]:
        """The ``model`` of each request so far, in order."""
        with self._lock:
            return [str(r["body"].get("model")) for r in self.requests]

    def _next(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[dict[str, Any], int]:
        model = str(body.get("model"))
        with self._lock:
            self.requests.append({"body": body, "headers": headers})
            request_no = len(self.requests)
            for reply in self._script:
                if reply.get("model") in (None, model):
                    self._script.remove(reply)
                    if "model" in reply:
                        self._last_by_model[model] = reply
                    else:
                        self._last = reply
                    return reply, request_no
            return self._last_by_model.get(model, self._last), request_no

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
