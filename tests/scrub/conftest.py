import pytest

from slmconvert.invocation import Invocation, Request, Response, Source


def make_inv(messages, content=None, tool_calls=(), session="s1", meta=None, n=0):
    return Invocation(id=f"{session}-{n}", source=Source("test", "mem", f"index {n}"), session_id=session, step=n,
                      request=Request(messages=list(messages)), response=Response(content=content, tool_calls=list(tool_calls)),
                      meta=meta or {})


@pytest.fixture
def scrub(tmp_path):
    """Scrub invocations with a config; returns (invocations, report)."""
    from slmconvert.config import ScrubConfig
    from slmconvert.scrub.engine import scrub_invocations
    from slmconvert.workspace import Workspace

    def run(invs, **cfg):
        return scrub_invocations(list(invs), ScrubConfig(**cfg), Workspace(tmp_path / "ws"))

    return run
