"""Real servers on loopback: slmconvert serve under uvicorn, and a small fake upstream LLM."""

import threading
import time

import pytest

from tests.conftest import FakeLLM
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


FakeUpstream = FakeLLM


@pytest.fixture
def upstream():
    up = FakeUpstream()
    yield up
    up.close()
