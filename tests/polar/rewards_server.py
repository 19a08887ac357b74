"""A small stand-in for `polar serve` on loopback (real HTTP) and helpers shared by test_reward.py (the
trainers' hooks) and test_reward_client.py, test_reward_client_waits.py (the HTTP clients)."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RewardsServer:
    """POST /v1/rewards -> one reward per item (len(output)), answered as `mode` says:
    "ok" in order; "reversed" in reverse order, each with its index; "short" one reward fewer;
    "html" a 200 that is not JSON; "408-once" a 408 (the body came too slowly) to the first request;
    "nan", "text", "null", "huge": the reward of an output of 4 characters as NaN (which Python's json
    writes), as a string, as null, as an integer of 401 digits (JSON's numbers have no bound). An item
    whose output is a number gets a 400 naming it, one whose output is "busy" a 503. The first
    `overloaded` requests get `overload_status` with "Retry-After: 0", as a full queue answers; a body
    over `max_body` bytes a 413 as `polar serve --max-body-bytes` gives it. `keep_alive`: HTTP/1.1
    connections kept open, as `polar serve` keeps them; `ports`: each request's client port (its
    connection)."""

    def __init__(self, mode: str = "ok", overloaded: int = 0, overload_status: int = 429, port: int = 0,
                 max_body: int = 0, keep_alive: bool = False):
        self.mode = mode
        self.bodies: list = []
        self.sizes: list = []  # bytes of each body
        self.ports: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            if keep_alive:
                protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw_body = self.rfile.read(int(self.headers["Content-Length"]))
                server.ports.append(self.client_address[1])
                if max_body and len(raw_body) > max_body:
                    raw = json.dumps({"error": {"message": f"the body is {len(raw_body)} bytes, more than this "
                                                           f"server's limit of {max_body} (--max-body-bytes)"}})
                    self.send_response(413)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw.encode())
                    return
                body = json.loads(raw_body)
                server.bodies.append(body)
                server.sizes.append(len(raw_body))
                if len(server.bodies) <= overloaded:
                    raw = json.dumps({"error": {"message": "the server's queue is full"}}).encode()
                    self.send_response(overload_status)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                bad = [i for i, it in enumerate(body["items"]) if not isinstance(it["output"], str)]
                status = (408 if server.mode == "408-once" and len(server.bodies) == 1 else
                          503 if any(it["output"] == "busy" for it in body["items"]) else 0)
                if status and not bad:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if bad:  # as `polar serve` names a bad item: by its index in the request it got
                    raw = json.dumps({"error": {"message": f"items[{bad[0]}].output must be a string or an "
                                                           "array of messages, got number"}}).encode()
                    self.send_response(400)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                data = [{"index": i, "reward": float(len(it["output"]))} for i, it in enumerate(body["items"])]
                unusable = {"nan": float("nan"), "text": "4.0", "null": None, "huge": 10 ** 400}
                for d in data:
                    if server.mode in unusable and d["reward"] == 4:
                        d["reward"] = unusable[server.mode]
                if server.mode == "reversed":
                    data = data[::-1]
                elif server.mode == "short":
                    data = data[:-1]
                raw = b"<html>proxy</html>" if server.mode == "html" else json.dumps({"data": data}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released): a server not there, or one started later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def at_once(fn, n: int = 6) -> list:
    """fn() from n threads released together: what each got."""
    start = threading.Barrier(n)

    def one(_):
        start.wait()
        return fn()

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))
