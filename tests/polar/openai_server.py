"""A small OpenAI-compatible server on loopback, for tests that talk to policy endpoints.

    with FakeOpenAIServer({"base-a": "ok", "chatty": "ok", "looper": "loop", "broken": "fail"}) as srv:
        srv.base_url            # http://127.0.0.1:PORT/v1
        srv.requests            # every request body received, in arrival order

POST /v1/completions and /v1/chat/completions answer with `fake_text(model, prompt, seed)`: a
deterministic function of the model name, the prompt (the chat user message) and the request seed,
so a test can recompute what any policy must have returned. Behaviour per model:

    ok     the text
    loop   the text followed by LOOP_CHUNK x LOOP_COPIES and a partial copy (a repetition loop)
    fail   always HTTP 500
    busy   HTTP 429 on the first attempt of each (prompt, seed), the text on the next
    empty  an empty completion: "" as completion text, null as chat message content
    surrogate  the text ending in a lone surrogate (JSON "\ud800", which Python's json writes and reads)
    refuse the HTTP 400 a hosted API gives a parameter it does not take (every request)
    picky  HTTP 400 for the prompts `picky_refuses(prompt)` names (about half), the text for the others

An unknown model gets 404, like vLLM. Setting `fail_after = N` makes every request after the first N
successful ones get HTTP 503 (a server that starts failing mid-run); set it back to None to heal.
`delay` seconds are slept before each answer. Setting `hold_after = N` makes every request after the
first N successful ones wait until `release()` (a run that can be killed mid-way on any machine).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("the", "policy", "reward", "model", "samples", "a", "river", "of", "tokens", "under", "bright",
         "stars", "while", "seven", "quiet", "engines", "hum", "and", "data", "flows")
LOOP_CHUNK = "again and again we go round. "
LOOP_COPIES = 6


def fake_text(model: str, prompt: str, seed) -> str:
    digest = hashlib.sha256(f"{model}\x00{prompt}\x00{seed}".encode()).digest()
    n = 6 + digest[0] % 10
    return " ".join(WORDS[b % len(WORDS)] for b in digest[1:1 + n]) + "."


def picky_refuses(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] % 2 == 0


def fake_loop_text(model: str, prompt: str, seed) -> str:
    return fake_text(model, prompt, seed) + " " + LOOP_CHUNK * LOOP_COPIES + LOOP_CHUNK[:7]


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog of 5 makes the kernel reset connections when the client
    # opens dozens at once on a loaded machine; a real server's backlog is in the hundreds.
    request_queue_size = 512


class FakeOpenAIServer:
    def __init__(self, models: dict[str, str], fail_after: int | None = None, delay: float = 0.0,
                 hold_after: int | None = None):
        self.models = dict(models)
        self.fail_after = fail_after
        self.delay = delay
        self.hold_after = hold_after
        self._released = threading.Event()
        self.requests: list[dict] = []
        self.served = 0
        self._seen_busy: set = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": m} for m in server.models]})
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                chat = self.path == "/v1/chat/completions"
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with server._lock:
                    server.requests.append(dict(body, _path=self.path))
                model = body.get("model")
                behaviour = server.models.get(model)
                if behaviour is None:
                    return self._send(404, {"error": {"message": f"The model `{model}` does not exist."}})
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                seed = body.get("seed")
                if server.delay:
                    time.sleep(server.delay)
                if server.hold_after is not None and server.served >= server.hold_after:
                    server._released.wait(120)
                if behaviour == "fail":
                    return self._send(500, {"error": {"message": "internal server error"}})
                if behaviour == "refuse" or (behaviour == "picky" and picky_refuses(prompt)):
                    return self._send(400, {"error": {"message": "Unrecognized request argument supplied: top_k"}})
                with server._lock:
                    if server.fail_after is not None and server.served >= server.fail_after:
                        return self._send(503, {"error": {"message": "server going away"}})
                    if behaviour == "busy" and (prompt, seed) not in server._seen_busy:
                        server._seen_busy.add((prompt, seed))
                        return self._send(429, {"error": {"message": "slow down"}})
                    server.served += 1
                text = (fake_loop_text if behaviour == "loop" else fake_text)(model, prompt, seed)
                if behaviour == "empty":
                    text = None if chat else ""
                elif behaviour == "surrogate":
                    text += "\ud800"
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                          if chat else {"index": 0, "text": text, "finish_reason": "stop"})
                self._send(200, {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                                 "model": model, "choices": [choice]})

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def release(self) -> None:
        self._released.set()

    def __exit__(self, *exc) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
