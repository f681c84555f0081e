"""Real servers on loopback: slmconvert serve under uvicorn, and a small fake upstream LLM."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.evaluate.conftest import tuned_ws  # noqa: F401  (a demo workspace fine-tuned with a tiny model)


class Uvicorn:
    """Runs an ASGI app on 127.0.0.1 on a free port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


class FakeUpstream:
    """An OpenAI-compatible LLM: answers every chat completion, records what it received."""

    def __init__(self, delay: float = 0.0):
        self.seen = []
        self.delay = delay
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if outer.delay:
                    time.sleep(outer.delay)
                out = json.dumps({"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": body.get("model", "gpt-4o"),
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "The LLM answered."},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def upstream():
    up = FakeUpstream()
    yield up
    up.close()
