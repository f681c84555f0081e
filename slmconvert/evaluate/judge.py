"""Optional LLM-as-judge through any OpenAI-compatible `/chat/completions` endpoint.

Only text replies are judged (tool calls are checked exactly). The judge sees the user's turn,
the reference answer (the LLM's logged reply) and the SLM's answer, and grades 1-5; the score
is mapped to [0, 1]. The API key comes from an environment variable and is never stored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

RUBRIC = (
    "You grade a candidate reply of a customer-facing assistant against a reference reply written by a "
    "stronger model for the same conversation turn. Grade 5 when the candidate says the same things "
    "(facts, numbers, decisions, next step), 3 when it is partly right or misses something important, 1 when "
    "it is wrong or unhelpful. Wording and style do not matter. Answer with the grade digit only."
)

_GRADE = re.compile(r"\b([1-5])\b")


@dataclass
class JudgeResult:
    score: float | None  # (grade - 1) / 4, None when the judge failed
    error: str | None = None


class Judge:
    def __init__(self, url: str, model: str, api_key_env: str | None = None, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env or "", "") if self.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def grade(self, turn: str, reference: str, candidate: str) -> JudgeResult:
        import httpx

        body = {"model": self.model, "temperature": 0, "max_tokens": 4, "messages": [
            {"role": "system", "content": RUBRIC},
            {"role": "user", "content": f"Conversation turn:\n{turn}\n\nReference reply:\n{reference}\n\nCandidate reply:\n{candidate}\n\nGrade (1-5):"},
        ]}
        try:
            r = httpx.post(self.url, json=body, headers=self._headers(), timeout=self.timeout_s)
        except httpx.HTTPError as e:
            return JudgeResult(None, f"{type(e).__name__}: {e}")
        if r.status_code != 200:
            return JudgeResult(None, f"HTTP {r.status_code} from {self.url}")
        try:
            text = r.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return JudgeResult(None, "the judge's answer is not a chat completion")
        m = _GRADE.search(text)
        if not m:
            return JudgeResult(None, f"no grade 1-5 in the judge's answer {text[:40]!r}")
        return JudgeResult((int(m.group(1)) - 1) / 4.0)
