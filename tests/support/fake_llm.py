"""A real local HTTP server speaking the OpenAI chat-completions API, with scripted answers.

The only simulated component the tests use: models cannot be reached from the test
machines. Bound to 127.0.0.1 on a free port; point an agent at it with ``api_base``.

Each request takes the next scripted reply: ``{"content": "..."}`` for an answer, or
``{"status": 429, "headers": {"Retry-After": "1"}}`` for an error. With the script
exhausted, the last reply repeats. Requests are recorded for assertions.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _tokens(text: str) -> int:
    # Roughly four characters per token, like English text through a BPE tokenizer.
    return max(1, len(text) // 4)


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._script: deque[dict[str, Any]] = deque()
        self._last: dict[str, Any] = {"content": "{}"}
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
                reply = fake._next(body, dict(self.headers))
                status = int(reply.get("status", 200))
                if status != 200:
                    self._send(status, {"error": {"message": "scripted error"}}, reply.get("headers", {}))
                    return
                content = reply["content"]
                prompt = "".join(str(m.get("content", "")) for m in body.get("messages", []))
                usage = {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(content)}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(fake.requests)}",
                        "object": "chat.completion",
                        "model": body.get("model", "fake"),
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
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

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *replies: dict[str, Any]) -> None:
        with self._lock:
            self._script.extend(replies)

    def _next(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            self.requests.append({"body": body, "headers": headers})
            if self._script:
                self._last = self._script.popleft()
            return self._last

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
