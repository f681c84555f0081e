"""Log formats: each maps one raw record to invocations in the shared data model.

Register a new one with `@log_formats.register("name")` on a `LogFormat` subclass; `sniff`
says whether a record looks like this format (used for auto-detection), `parse` maps it or
raises `RecordError` with a reason that lands in the quarantine file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from slmconvert.invocation import (
    ROLE_ALIASES,
    Invocation,
    RecordError,
    Request,
    Response,
    Source,
    Usage,
    invocation_id,
    message_id,
    normalize_message,
    normalize_timestamp,
    response_from_message,
)
from slmconvert.collect.dialects import LANGCHAIN_TYPES, answer_body, chat_messages, maybe_json, request_body, tool_list, usage_of
from slmconvert.collect.textactions import TextActionRule, read_actions
from slmconvert.io import canonical_json, sha256_text
from slmconvert.registry import Registry

# Request parameters worth keeping. Anything else in a request body (api keys, user ids,
# vendor extensions) is not stored.
KEPT_PARAMS = (
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "response_format", "tool_choice",
    "stop", "seed", "n", "parallel_tool_calls", "presence_penalty", "frequency_penalty", "reasoning_effort",
    "max_output_tokens", "top_k",
)
SESSION_KEYS = ("session_id", "conversation_id", "thread_id", "trace_id", "chat_id", "dialog_id", "simulation_id",
                "episode_id", "id")
# A benchmark task is run several times: its id names a session together with the trial number.
TASK_KEYS = ("task_id", "sample_id", "example_id")
TRIAL_KEYS = ("trial", "trial_id", "run", "attempt", "seed")
# Keys whose values are credentials or transport details: never stored, counted as dropped.
SECRET_KEYS = {"headers", "authorization", "api_key", "apikey", "x-api-key", "api-key", "token", "access_token",
               "secret", "password", "cookie", "cookies", "request_headers", "response_headers"}
MESSAGE_LIST_KEYS = ("messages", "traj", "conversation", "history", "trajectory", "dialog", "turns")
# Fields that name the agent. A client, user or tenant id is never one: it splits one agent
# into as many call sites as it has users.
AGENT_KEYS = ("agent", "agent_name", "agent_id", "workload_id")
# A file- or conversation-level field holding the agent's instructions, stored once instead
# of as a system message in each conversation.
SYSTEM_KEYS = ("system_prompt", "system", "instructions", "policy", "system_message", "wiki")
# Sibling fields of a prompt's message list that hold that call's answer.
RESPONSE_KEYS = ("response", "output", "completion", "answer", "result")
_MAX_NEST = 12
# Per-record ids of the end user or client app: a session hint for gateway logs, never the agent.
USER_KEYS = ("user_id", "client_id", "user", "end_user_id", "customer_id")


@dataclass
class ParseContext:
    path: str
    locator: str
    format: str
    agent: str | None = None
    model: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    # Text-action rules the user declared (always applied) and built-in ones (applied to
    # conversations without structured tool calls only); what they matched, by rule and tool.
    text_rules: list[TextActionRule] = field(default_factory=list)
    auto_rules: list[TextActionRule] = field(default_factory=list)
    text_actions: dict[str, dict[str, int]] = field(default_factory=dict)
    messages_path: str | None = None

    noted: dict[str, int] = field(default_factory=dict)
    # Run-wide state a format keeps across records and files (a batch's requests awaiting their answers).
    shared: dict[str, Any] = field(default_factory=dict)
    # Parts of a record that are bad while the rest is good (one span of an OTLP export):
    # (locator, reason, code), quarantined like a bad record.
    bad: list[tuple[str, str, str]] = field(default_factory=list)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def note(self, what: str, n: int = 1) -> None:
        """Count something kept in another form (not dropped)."""
        self.noted[what] = self.noted.get(what, 0) + n


class LogFormat:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def sniff(self, record: Any) -> bool:
        raise NotImplementedError

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        raise NotImplementedError

    def finish(self, shared: dict[str, Any], new_ctx: Callable[[str, str], ParseContext]
               ) -> tuple[list[Invocation], list[tuple[str, str, str, str]]]:
        """Called once after every file of a run: invocations completed from run-wide state (`new_ctx(path,
        locator)` gives each its parse context), and (path, locator, reason, code) of what never could be."""
        return [], []


log_formats: Registry[type[LogFormat]] = Registry("log format")


def get_format(name: str) -> LogFormat:
    return log_formats.get(name)()


# --------------------------------------------------------------------------- shared helpers


def _scalar_meta(record: dict, skip: set[str], ctx: ParseContext, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Scalar fields of a record, nested dicts flattened to dotted keys; credentials dropped."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if not prefix and key in skip:
            continue
        if str(key).lower() in SECRET_KEYS:
            ctx.drop("secret_fields")
            continue
        name = f"{prefix}{key}"
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[name] = value
        elif isinstance(value, dict) and depth < 3:
            out.update(_scalar_meta(value, set(), ctx, f"{name}.", depth + 1))
    return out


def _normalize_tools(raw: Any, where: str) -> list[dict] | None:
    """Tools as OpenAI function schemas ({"type": "function", "function": {...}})."""
    if raw is None:
        return None
    raw, _ = tool_list(raw)
    if not isinstance(raw, list):
        raise RecordError(f"{where}: tools must be a list, got {type(raw).__name__}")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise RecordError(f"{where}[{i}]: a tool must be an object")
        fn = t.get("function") if isinstance(t.get("function"), dict) else t
        if not isinstance(fn.get("name"), str):
            raise RecordError(f"{where}[{i}]: tool has no name")
        spec = {"name": fn["name"], "description": fn.get("description", ""),
                "parameters": fn.get("parameters", fn.get("input_schema", {"type": "object", "properties": {}}))}
        tools.append({"type": "function", "function": spec})
    return tools or None


def _id_value(record: dict, key: str) -> str | None:
    v = record.get(key)
    return str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) else None


def _session_from(record: dict) -> str | None:
    for key in SESSION_KEYS:
        v = _id_value(record, key)
        if v is not None:
            return f"{key}:{v}"
    for key in TASK_KEYS:
        v = _id_value(record, key)
        if v is not None:
            trial = next((f"/{t}:{n}" for t in TRIAL_KEYS if (n := _id_value(record, t)) is not None), "")
            return f"{key}:{v}{trial}"
    return None


def _usage(raw: Any) -> Usage | None:
    return usage_of(raw)


def _number(record: dict, keys: tuple[str, ...], where: str) -> float | None:
    for k in keys:
        if k in record and record[k] is not None:
            v = record[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise RecordError(f"{where}: {k} must be a non-negative number, got {v!r}", "wrong_type")
            return float(v)
    return None


def _messages(raw: Any, where: str, ctx: ParseContext | None = None) -> list[dict]:
    if not isinstance(raw, list):
        raise RecordError(f"{where}: messages must be a list, got {type(raw).__name__}", "wrong_type")
    out = [normalize_message(m, f"{where}[{i}]") for i, m in enumerate(_environment_events(chat_messages(raw, where), ctx))]
    return _name_tool_results(out)


def _name_tool_results(messages: list[dict]) -> list[dict]:
    """Tool results named after the call they answer, as chat completions logs them: APIs that log
    results by call id only (Anthropic, Responses, OTel) then give the same messages."""
    names: dict[str, str] = {}
    for m in messages:
        for c in m.get("tool_calls") or []:
            if c.get("id"):
                names[c["id"]] = c["function"]["name"]
        if m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]
    return messages


def _environment_events(raw: list, ctx: ParseContext | None) -> list:
    """A user (simulated or real) that calls its own tools acts on its environment: the agent made
    no call. Those calls and their results stay in the prompt as user-side context text."""
    user_calls: set[str] = set()
    out = []
    for m in raw:
        if not isinstance(m, dict):
            out.append(m)
            continue
        raw_role = m.get("role", m.get("from"))
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        calls = m.get("tool_calls")
        if role == "user" and isinstance(calls, list) and calls:
            lines = [m["content"]] if isinstance(m.get("content"), str) and m["content"] else []
            for c in calls:
                fn = c.get("function", c) if isinstance(c, dict) else {}
                if isinstance(c, dict) and isinstance(c.get("id"), str):
                    user_calls.add(c["id"])
                args = fn.get("arguments", fn.get("args", {}))
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                lines.append(f"[user action] {fn.get('name', '?')}({args})")
            out.append({"role": "user", "content": "\n".join(lines)})
            if ctx is not None:
                ctx.note("user_side_tool_calls", len(calls))
            continue
        if role == "tool" and (isinstance(m.get("tool_call_id"), str) and m["tool_call_id"] in user_calls or m.get("requestor") == "user"):
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            out.append({"role": "user", "content": f"[user action result] {text}"})
            continue
        out.append(m)
    return out


def _apply_text_actions(messages: list[dict], ctx: ParseContext) -> list[dict]:
    return read_actions(messages, ctx.text_rules, ctx.auto_rules, ctx.text_actions)


def _call(prompt: list[dict], answer: dict, finish: str | None, ctx: ParseContext) -> tuple[list[dict], Response]:
    """The prompt and the answer of one logged call, text actions read over both together (they are one
    conversation: the history shows earlier actions the way the answer is stored)."""
    converted = _apply_text_actions([*prompt, answer], ctx)
    if converted[-1] is not answer:  # the answer was a text action
        finish = "tool_calls"
    return converted[:-1], response_from_message(converted[-1], finish)


def _opening(messages: list[dict]) -> list[dict]:
    """The messages up to and including the first user turn: what one conversation's calls share."""
    head = []
    for m in messages:
        head.append(m)
        if m["role"] == "user":
            break
    return head


def _agent_of(record: dict) -> str | None:
    for key in AGENT_KEYS:
        v = record.get(key)
        if isinstance(v, str) and v.strip():
            return v
    return None


def _system_field(chain: list[dict]) -> str | None:
    """The nearest instructions field (a prose string) up the chain of enclosing objects."""
    for obj in reversed(chain):
        for key in SYSTEM_KEYS:
            v = obj.get(key)
            if isinstance(v, str) and len(v) >= 40 and " " in v:
                return v
    return None


def _make(ctx: ParseContext, session: str, step: int, messages: list[dict], tools: list[dict] | None,
          params: dict, response: Response, locator: str | None = None, **fields: Any) -> Invocation:
    inv_id = invocation_id(session, [message_id(m) for m in messages], tools, params, response)
    hci = fields.pop("hci", None)
    return Invocation(
        id=inv_id,
        source=Source(ctx.format, ctx.path, locator or ctx.locator),
        session_id=session,
        step=step,
        request=Request(messages=messages, tools=tools, params=params, tools_source="logged" if tools else None),
        response=response,
        agent=fields.pop("agent", None) or ctx.agent,
        model=fields.pop("model", None) or ctx.model,
        hci=bool(hci) if isinstance(hci, bool) else not response.tool_calls,
        **fields,
    )


# --------------------------------------------------------------------------- 1. request/response


@log_formats.register("request-response")
class RequestResponseFormat(LogFormat):
    """One record per LLM call: a request body and its response body.

    `{"request": ..., "response": ...}` (NVIDIA's data-flywheel, most gateways), also under
    `request_body`/`response_body` or `input`/`output`, bodies as objects or JSON strings. The
    bodies may be OpenAI chat completions, Anthropic Messages (`system`, content blocks
    `text`/`tool_use`/`tool_result`, `tools[].input_schema`, `stop_reason`) or the OpenAI Responses
    API (`instructions`, `input` items with `function_call`/`function_call_output`, flat `tools`,
    `output` items). Optional: timestamp, workload_id, client_id, latency_ms, usage,
    session_id / conversation_id / trace_id.
    """

    name = "request-response"
    description = ('one call per record: {"request", "response"} (also request_body/response_body, input/output); '
                   "OpenAI chat, Anthropic Messages or OpenAI Responses bodies (gateways, data-flywheel)")
    PAIRS = (("request", "response"), ("request_body", "response_body"), ("input", "output"))
    RECORD_KEYS = {"request", "response", "request_body", "response_body", "input", "output", "timestamp", "usage",
                   "latency_ms", "duration_ms", "cost_usd", "cost", "client_id", "workload_id", "agent", "model", "step",
                   "hci", *SESSION_KEYS}

    @classmethod
    def pair(cls, record: Any) -> tuple[str, str] | None:
        """The (request key, response key) of a record, or None when it holds no such pair."""
        if not isinstance(record, dict):
            return None
        for req_key, resp_key in cls.PAIRS:
            req = maybe_json(record.get(req_key))
            if isinstance(req, dict) and resp_key in record and (req_key == "request" or "messages" in req or "input" in req):
                return req_key, resp_key
        return None

    def sniff(self, record: Any) -> bool:
        return self.pair(record) is not None

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        if not isinstance(record, dict):
            raise RecordError(f"record must be an object, got {type(record).__name__}", "wrong_type")
        req_key, resp_key = self.pair(record) or ("request", "response")
        req = maybe_json(record.get(req_key))
        if not isinstance(req, dict):
            raise RecordError(f"{req_key} must be an object", "missing_field")
        if "messages" not in req and "input" not in req:
            raise RecordError(f"{req_key}.messages is missing", "missing_field")
        return [self.call(record, req, record.get(resp_key), ctx, req_key, resp_key)]

    def call(self, record: dict, req: dict, raw_answer: Any, ctx: ParseContext, req_key: str = "request",
             resp_key: str = "response", session: str | None = None) -> Invocation:
        """The invocation of one request body and its answer; `record` holds the call's other fields."""
        raw_messages, raw_tools, body, builtin = request_body(req, req_key)
        if builtin:
            ctx.drop("builtin_tools", builtin)
        if isinstance(req.get("previous_response_id"), str):
            ctx.note("prompts_continuing_a_previous_response")  # the earlier turns live in that response
        messages = _messages(raw_messages, f"{req_key}.messages" if "messages" in req else f"{req_key}.input", ctx)
        tools = _normalize_tools(raw_tools, f"{req_key}.tools")
        params = {k: body[k] for k in KEPT_PARAMS if k in body}
        answer, finish, resp_model, resp_usage, created = self._response(raw_answer, resp_key)
        messages, response = _call(messages, answer, finish, ctx)
        user = next((v for k in USER_KEYS if (v := _id_value(record, k)) is not None), None)
        session = session or _session_from(record) or self._prefix_session(messages, user)
        step = record.get("step")
        if not (isinstance(step, int) and not isinstance(step, bool)):
            step = sum(1 for m in messages if m["role"] == "assistant")
        meta = _scalar_meta(record, self.RECORD_KEYS, ctx)
        for key in ("workload_id", "client_id"):
            if isinstance(record.get(key), (str, int)):
                meta[key] = record[key]
        return _make(
            ctx, session, step, messages, tools, params, response,
            agent=_agent_of(record),
            model=record.get("model") if isinstance(record.get("model"), str) else resp_model or req.get("model"),
            timestamp=normalize_timestamp(record.get("timestamp", created), "timestamp"),
            usage=_usage(record.get("usage")) or resp_usage,
            latency_ms=_number(record, ("latency_ms", "duration_ms"), "record"),
            cost_usd=_number(record, ("cost_usd", "cost"), "record"),
            hci=record.get("hci"),
            meta=meta,
        )

    @staticmethod
    def _prefix_session(messages: list[dict], user: Any = None) -> str:
        """Gateways log calls one by one; calls of one conversation share its opening turns (and
        its user: two users who open with the same "hi" are two conversations)."""
        return "prefix:" + sha256_text(canonical_json([_opening(messages), user]))[:16]

    @staticmethod
    def _response(raw: Any, where: str = "response") -> tuple[dict, str | None, str | None, Usage | None, Any]:
        """(assistant message, finish reason, model, usage, created) of a logged answer."""
        if raw is None:
            raise RecordError(f"{where} is missing", "missing_field")
        answer, finish, model, usage, created = answer_body(raw, where)
        msg = normalize_message(answer, where)
        if msg["role"] != "assistant":
            raise RecordError(f"{where} message has role {msg['role']!r}, expected assistant", "unknown_role")
        if msg.get("content") is None and not msg.get("tool_calls"):
            raise RecordError(f"{where} has neither content nor tool calls", "empty_response")
        return msg, finish, model, usage, created


# --------------------------------------------------------------------------- 2. trajectories


@log_formats.register("trajectory")
class TrajectoryFormat(LogFormat):
    """Whole conversations; every assistant message is one call whose prompt is all messages before it.

    The message lists are found wherever they are nested (`output.history`, a list of calls each
    holding its own prompt, several conversations in one object), or at `collect.messages_path`.
    A list with an answer beside it (`{"messages": [...], "response": {...}}`) is one call.
    Instructions stored once (a `system_prompt` / `policy` field of the conversation or the file)
    become the system message. Conversation-level fields (ids, reward, trial ...) go to `meta`.
    """

    name = "trajectory"
    description = "conversations, message lists nested anywhere (messages/history/traj/..., or --messages-path)"

    def _nodes(self, record: Any, ctx: ParseContext | None = None) -> list[tuple[str, list, list[dict]]]:
        """(path, message list, chain of enclosing objects) for every conversation in a record."""
        if ctx is not None and ctx.messages_path:
            return _at_path(record, ctx.messages_path)
        out: list[tuple[str, list, list[dict]]] = []
        _find_message_lists(record, "", [], out, 0)
        return out

    def sniff(self, record: Any) -> bool:
        return bool(self._nodes(record))

    def targets(self, raw_messages: list, index: int) -> bool:
        """Whether the assistant message at `index` is an LLM call worth keeping."""
        return True

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        nodes = self._nodes(record, ctx)
        if not nodes:
            if ctx.messages_path:
                raise RecordError(f"nothing at messages path {ctx.messages_path!r} is a list of chat messages", "missing_field")
            raise RecordError("no list of chat messages (objects with a role) anywhere in the record", "missing_field")
        root = record if isinstance(record, dict) else {}
        record_session = _session_from(root)
        parsed = []
        for path, raw_messages, chain in nodes:
            where = path or "conversation"
            messages = _messages(raw_messages, where, ctx)
            system = _system_field([root, *chain]) if not any(m["role"] == "system" for m in messages) else None
            if system is not None:
                messages = [{"role": "system", "content": system}, *messages]
            parsed.append((path, raw_messages, chain, messages, system is not None))
        openings = {sha256_text(canonical_json(_opening(m)))[:12] for *_, m, _ in parsed}
        out, seen = [], set()
        for path, raw_messages, chain, messages, shifted in parsed:
            owner = chain[-1] if chain else root
            conv = {**root, **owner} if owner is not root else root
            opening = sha256_text(canonical_json(_opening(messages)))[:12]
            session = _nested_session(chain, root) or (
                f"{record_session}:{opening}" if record_session and len(openings) > 1 else record_session
            ) or "conv:" + sha256_text(canonical_json(messages))[:16]
            tools = _normalize_tools(_first(chain, root, ("tools", "functions")), f"{path}.tools" if path else "tools")
            skip = {*MESSAGE_LIST_KEYS, *SYSTEM_KEYS, *RESPONSE_KEYS, "tools", "functions", "model", *AGENT_KEYS}
            meta = _scalar_meta(conv, skip, ctx)
            params = {k: conv[k] for k in KEPT_PARAMS if k in conv}
            model = _first(chain, root, ("model",))
            fields = {"model": model if isinstance(model, str) else None, "agent": _agent_of(conv) or _agent_of(root), "meta": meta}
            answer = _response_beside(chain, root)
            if answer is not None:  # one call: this list is its prompt
                answer_msg, finish, resp_model, usage, _ = RequestResponseFormat._response(answer)
                prompt, response = _call(messages, answer_msg, finish, ctx)
                inv = _make(ctx, session, sum(m["role"] == "assistant" for m in prompt), prompt, tools, params, response,
                            f"{ctx.locator} {where}", usage=usage, **{**fields, "model": fields["model"] or resp_model})
                if inv.id not in seen:
                    seen.add(inv.id)
                    out.append(inv)
                continue
            messages = _apply_text_actions(messages, ctx)
            step = 0
            for i, msg in enumerate(messages):
                if msg["role"] != "assistant":
                    continue
                if not self.targets(raw_messages, i - shifted):
                    ctx.drop("not_a_target")
                    continue
                response = response_from_message(msg)
                if response.content is None and not response.tool_calls:
                    ctx.drop("empty_response")
                    continue
                nested = path and not (path in MESSAGE_LIST_KEYS and len(nodes) == 1)
                loc = f"{ctx.locator} {path + ' ' if nested else ''}message {i - shifted}"
                inv = _make(ctx, session, step, messages[:i], tools, params, response, loc, **fields)
                step += 1
                if inv.id not in seen:  # the calls of one conversation logged as growing prompts
                    seen.add(inv.id)
                    out.append(inv)
        if not out:
            raise RecordError("conversation has no assistant message with content or tool calls", "no_calls")
        return out


def _role_of(x: Any) -> str | None:
    """The chat role of a message (OpenAI / ShareGPT `from` / LangChain `type` or class), None if not one."""
    if not isinstance(x, dict):
        return None
    role = x.get("role", x.get("from"))
    if isinstance(role, str):
        return ROLE_ALIASES.get(role.strip().lower())
    kind = x.get("type")
    if isinstance(kind, str) and kind.lower() in LANGCHAIN_TYPES and ("content" in x or isinstance(x.get("data"), dict)):
        kind_role = LANGCHAIN_TYPES[kind.lower()]
        return kind_role or (ROLE_ALIASES.get(str((x.get("data") or {}).get("role", "")).lower()))
    if x.get("lc") == 1 and isinstance(x.get("id"), list) and x["id"] and isinstance(x.get("kwargs"), dict):
        return LANGCHAIN_TYPES.get(str(x["id"][-1]).lower()) or ROLE_ALIASES.get(str(x["kwargs"].get("role", "")).lower())
    return None


def _is_message(x: Any) -> bool:
    return _role_of(x) is not None


def _is_message_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and _is_message(v[0]) and sum(map(_is_message, v)) * 5 >= len(v) * 4


def _find_message_lists(value: Any, path: str, chain: list[dict], out: list, depth: int) -> None:
    if depth > _MAX_NEST:
        return
    if _is_message_list(value):
        out.append((path, value, chain))
        return
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (k not in MESSAGE_LIST_KEYS, MESSAGE_LIST_KEYS.index(k) if k in MESSAGE_LIST_KEYS else 0))
        for k in keys:
            v = value[k]
            if isinstance(v, (dict, list)):
                _find_message_lists(v, f"{path}.{k}" if path else str(k), [*chain, value], out, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, (dict, list)):
                _find_message_lists(v, f"{path}[{i}]", chain, out, depth + 1)


def _at_path(record: Any, dotted: str) -> list[tuple[str, list, list[dict]]]:
    """Message lists at a dotted path; `*` steps into every element of a list ("calls.*.messages")."""
    found = [("", record, [])]
    for part in dotted.split("."):
        nxt = []
        for path, value, chain in found:
            if part == "*" and isinstance(value, list):
                nxt += [(f"{path}[{i}]", v, chain) for i, v in enumerate(value)]
            elif isinstance(value, dict) and part in value:
                nxt.append((f"{path}.{part}" if path else part, value[part], [*chain, value]))
        found = nxt
    return [(p, v, c) for p, v, c in found if _is_message_list(v)]


def _first(chain: list[dict], root: dict, keys: tuple[str, ...]) -> Any:
    for obj in [*reversed(chain), root]:
        for k in keys:
            if obj.get(k) is not None:
                return obj[k]
    return None


def _nested_session(chain: list[dict], root: dict) -> str | None:
    """A session id named on an object below the record (a conversation inside a file-level object)."""
    for obj in reversed(chain):
        if obj is root:
            break
        session = _session_from({k: v for k, v in obj.items() if k != "id"})
        if session is not None:
            return session
    return None


def _response_beside(chain: list[dict], root: dict) -> Any:
    """An answer stored next to the prompt list (or next to the object holding it): {"choices": ...} or an assistant message."""
    for obj in list(reversed(chain))[:2]:
        for key in RESPONSE_KEYS:
            v = obj.get(key)
            if isinstance(v, dict) and (isinstance(v.get("choices"), list) or _role_of(v) == "assistant"):
                return v
    return None


# --------------------------------------------------------------------------- 3. OpenAI fine-tuning


@log_formats.register("openai-finetune")
class OpenAIFinetuneFormat(TrajectoryFormat):
    """OpenAI fine-tuning chat JSONL: {"messages": [...], "tools": [...]}; `weight: 0` marks non-targets."""

    name = "openai-finetune"
    description = 'OpenAI fine-tuning JSONL {"messages": [...], "tools": [...]}'
    KEYS = {"messages", "tools", "parallel_tool_calls", "functions"}

    def sniff(self, record: Any) -> bool:
        return (isinstance(record, dict) and isinstance(record.get("messages"), list)
                and set(record) <= self.KEYS and super().sniff(record))

    def targets(self, raw_messages: list, index: int) -> bool:
        raw = raw_messages[index]
        return not (isinstance(raw, dict) and raw.get("weight") == 0)


def _one_call(x: Any) -> bool:
    return isinstance(x, dict) and isinstance(x.get("request"), dict) and "response" in x


_OWNERS: dict[type, LogFormat] = {}


def _foreign_record(value: dict) -> bool:
    """A record of a format with its own nesting (an OTLP export, a Langfuse trace): never split here.
    Called for every record: the formats that say what they own are instantiated once."""
    for _, cls in log_formats:
        if hasattr(cls, "owns"):
            fmt = _OWNERS.get(cls) or _OWNERS.setdefault(cls, cls())
            if fmt.owns(value):
                return True
    return False


def expand_document(value: Any) -> list[Any]:
    """The records of a file that is one JSON object: the object itself when it is a record, else
    the items of its list of conversations or calls ({"data": [...]}, {"policy": "...", "results": [...]}),
    each given the file-level fields that belong to every conversation: instructions, tools,
    agent and model."""
    if not isinstance(value, dict) or RequestResponseFormat().sniff(value) or _foreign_record(value):
        return [value]
    if any(_is_message_list(v) for v in value.values()):
        return [value]
    lists = [(k, v) for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, (dict, list)) for x in v)]
    holding = [(k, v) for k, v in lists if any(TrajectoryFormat().sniff(x) or _one_call(x) for x in v[:5])]
    if len(holding) != 1:
        legacy = [k for k in ("data", "records", "conversations", "items", "logs", "invocations") if isinstance(value.get(k), list)]
        return value[legacy[0]] if len(legacy) == 1 and len(value) <= 3 else [value]
    shared = {k: value[k] for k in (*SYSTEM_KEYS, "tools", "functions", "model", *AGENT_KEYS) if k in value}
    # A trace or session named on the object holds all its calls; a bare "id" names the file.
    session = {k: value[k] for k in SESSION_KEYS if k != "id" and k in value}
    return [{**shared, **({} if _session_from(x) else session), **x} if isinstance(x, dict) else x for x in holding[0][1]]


# Most specific first: the tracing and gateway exports have marker fields of their own; a
# trajectory is any record holding a message list.
DETECTION_ORDER = ("otel", "langfuse", "langsmith", "litellm", "openai-batch", "request-response", "openai-finetune", "trajectory")


def format_names() -> list[str]:
    """Every registered format, in the order auto-detection tries them (plugins last)."""
    return [n for n in DETECTION_ORDER if n in log_formats] + [n for n in log_formats.names() if n not in DETECTION_ORDER]


def detect_format(samples: list[Any]) -> str | None:
    """The first format (most specific first) that matches most of the sample records."""
    if not samples:
        return None
    for name in format_names():
        fmt = get_format(name)
        hits = sum(1 for s in samples if fmt.sniff(s))
        if hits * 2 > len(samples):
            return name
    return None


from slmconvert.collect import observability as _observability  # noqa: E402,F401  (registers its formats)

__all__ = ["LogFormat", "ParseContext", "log_formats", "get_format", "detect_format", "expand_document", "format_names"]
