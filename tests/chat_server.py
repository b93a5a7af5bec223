"""A chat-completions server on 127.0.0.1 for tests: speaks ``/v1/chat/completions`` and
``/v1/models`` like an OpenAI-compatible server (vLLM, Ollama), answers by script, records
what it was sent."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    body: str | dict | None = None  # None: a well-formed answer made from the request
    content: str | None = None  # the answer text (None: numbered descriptions)
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


def fake_answer(body: dict) -> str:
    """Deterministic answer of a model to a request: numbered descriptions of the classes, or
    a counterfactual rewrite without them."""
    user = body["messages"][-1]["content"]
    seed = body.get("seed")
    if user.startswith("Rewrite"):
        return f'"An empty rainy street with puddles and neon signs, take {seed}."'
    line = re.search(r"Objects to include: (.*)\.", user).group(1)
    classes = re.findall(r'"([^"]+)"', line)
    n = int(re.search(r"Write (\d+) different", user).group(1))
    colours = ["red", "blue", "green", "grey", "yellow", "white", "black", "orange"]
    items = []
    for k in range(n):
        things = " next to a ".join(
            f"{colours[(seed + k + j) % 8]} {c}" for j, c in enumerate(classes)
        )
        items.append(f"{k + 1}. A {things} in a busy market, scene {seed}-{k}, {body['model']}.")
    return "Here you go:\n" + "\n".join(items)


class ChatServer:
    """ThreadingHTTPServer speaking /v1/chat/completions and /v1/models (listing ``models``);
    ``script(i, body)`` (i = 0-based chat request count) returns the Reply. Shuts itself down
    after ``lifetime`` seconds."""

    def __init__(self, script=lambda i, body: Reply(), lifetime: float = 30.0, models=("m",)):
        self.script = script
        self.models = list(models)
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        self.inflight = 0
        self.max_inflight = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload, headers=None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if self.path.endswith("/models"):
                    data = [{"id": m, "object": "model"} for m in server.models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"error": {"message": "no such route"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    i = len(server.bodies)
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization", ""))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    reply = server.script(i, body)
                    time.sleep(reply.delay)
                    if reply.status != 200:
                        err = {"error": {"message": f"scripted {reply.status}", "type": "x"}}
                        self._send(reply.status, err, reply.headers)
                    elif isinstance(reply.body, str):
                        self._send(200, reply.body.encode(), reply.headers)
                    else:
                        content = reply.content if reply.content is not None else fake_answer(body)
                        payload = reply.body or {
                            "id": f"c{i}",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content},
                                }
                            ],
                            "usage": {
                                "prompt_tokens": 100,
                                "completion_tokens": 10,
                                "total_tokens": 110,
                            },
                        }
                        self._send(200, payload, reply.headers)
                finally:
                    with lock:
                        server.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._timer = threading.Timer(lifetime, self.httpd.shutdown)
        self._timer.daemon = True

    @property
    def calls(self) -> int:
        return len(self.bodies)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
