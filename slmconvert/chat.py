"""Rendering invocations for an SLM, and parsing what it generates back into a Response.

A model whose chat template renders tools natively (Qwen, Llama 3.2, ...) gets the tools and
the tool calls through its own template, so a fine-tuned model answers in the format its
serving stack parses. A model whose template does not (SmolLM2, Gemma 3, Phi-3.5) gets the
fallback format: the tool schemas in the system message, tool calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` lines, tool results as user turns
wrapped in `<tool_response>`. `parse_completion` reads both.

`fit_prompt` fits a rendered prompt into its token budget (`prompt_budget`) the same way for
training, selection, evaluation and serving, so a call is cut alike in all four.
"""

from __future__ import annotations

import json
import re
import weakref
from collections import Counter
from typing import Any

from slmconvert.invocation import Response, ToolCall

FALLBACK_TOOLS_HEADER = (
    "You can call the following tools. To call one, answer with one line per call:\n"
    '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
    "<tools>\n__TOOLS__\n</tools>"
)


def prompt_budget(max_length: int, new_tokens: int, cap: int | None = None) -> int:
    """Tokens a prompt may take: the model's trained `max_length` less room for the answer, at most `cap`.
    Select, evaluate and serve share it. The room is `new_tokens` but at most a quarter of `max_length`:
    training fitted each prompt beside its own answer (mostly short), and a generation budget sized for
    the rare long answer (a 500-token booking) must not cut every prompt to half its trained length —
    a long answer runs past `max_length` instead, within the base model's context."""
    budget = max_length - min(new_tokens, max_length // 4)
    return min(cap, budget) if cap is not None else budget


def supports_native_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "tools" in template and "tool_call" in template


def _tool_call_text(name: str, arguments: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def answer_text(response: Response) -> str:
    """A logged answer as plain text: its tool calls in the fallback format, else its reply."""
    if response.tool_calls:
        return "\n".join(_tool_call_text(c.name, c.arguments) for c in response.tool_calls)
    return response.content or ""


def _fn(tc: dict) -> tuple[str, dict]:
    fn = tc.get("function", tc)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = {"_raw": args}
    return fn.get("name", ""), args


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages any chat template accepts: system/user/assistant only, plain string content."""
    out: list[dict] = []
    tool_block = ""
    if tools:
        tool_block = FALLBACK_TOOLS_HEADER.replace("__TOOLS__", "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools))

    def push(role: str, content: str) -> None:
        if out and out[-1]["role"] == role and role == "user":
            out[-1]["content"] += "\n" + content
        else:
            out.append({"role": role, "content": content})

    system_seen = False
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "system":
            system_seen = True
            push("system", content + ("\n\n" + tool_block if tool_block else ""))
        elif role == "tool":
            push("user", f"<tool_response>\n{content}\n</tool_response>")
        elif role == "assistant":
            calls = [_tool_call_text(*_fn(tc)) for tc in m.get("tool_calls") or []]
            push("assistant", "\n".join(([content] if content else []) + calls))
        else:
            push("user", content)
    if tool_block and not system_seen:
        out.insert(0, {"role": "system", "content": tool_block})
    return out


def native_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages with tool-call arguments as dicts (what HF templates expect)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "id": tc.get("id"), "function": {"name": n, "arguments": a}}
                               for tc in m["tool_calls"] for n, a in [_fn(tc)]]
            if m.get("content") is None:
                m["content"] = ""
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def render_prompt(tokenizer: Any, messages: list[dict], tools: list[dict] | None, native: bool | None = None) -> str:
    native = supports_native_tools(tokenizer) if native is None else native
    return render_conversation(tokenizer, messages, tools, native, add_generation_prompt=True)


def render_conversation(tokenizer: Any, messages: list[dict], tools: list[dict] | None, native: bool,
                        add_generation_prompt: bool = False) -> str:
    """The conversation as the template shows it: its last turn closed, or (`add_generation_prompt`) a prompt
    for the next answer."""
    if native:
        return tokenizer.apply_chat_template(native_messages(messages), tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(fallback_messages(messages, tools), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def response_message(response: Response) -> dict:
    return {"role": "assistant", "content": response.content or "",
            "tool_calls": [{"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                           for c in response.tool_calls] or None}


def render_completion(tokenizer: Any, messages: list[dict], tools: list[dict] | None, response: Response,
                      native: bool | None = None) -> str:
    """The text the model should generate after `render_prompt(...)`, end-of-turn included.

    Rendered by the template itself (the whole conversation minus the prompt), so the target
    is byte-for-byte what the template would show for this answer.
    """
    native = supports_native_tools(tokenizer) if native is None else native
    msg = response_message(response)
    if not msg["tool_calls"]:
        msg.pop("tool_calls")
    prompt = render_prompt(tokenizer, messages, tools, native)
    full = render_conversation(tokenizer, messages + [msg], tools, native)
    if full.startswith(prompt):
        return full[len(prompt):]
    # A template that rewrites earlier turns (e.g. drops reasoning) breaks the prefix property:
    # fall back to the answer text and the end-of-sequence token.
    body = fallback_messages([msg], None)[0]["content"]
    return body + (tokenizer.eos_token or "")


_OPEN_TAG, _CLOSE_TAG = "<tool_call>", "</tool_call>"
_DECODER = json.JSONDecoder()


def _tagged_calls(text: str) -> list[tuple[int, int, ToolCall | None]]:
    """Each `<tool_call>` block of `text`: (start, end, the call, or None when the block holds no valid call).
    A body that is JSON is read as JSON, so a string in it may hold anything, a `</tool_call>` included (a
    `think` call's thought did); a body that is not runs to the next closing tag, or to the end."""
    found, i = [], 0
    while (start := text.find(_OPEN_TAG, i)) >= 0:
        body = start + len(_OPEN_TAG)
        at = len(text) - len(text[body:].lstrip())
        try:
            value, end = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            value, end = None, -1
        call = _as_call(value) if end >= 0 else None
        if call is not None:
            after = len(text) - len(text[end:].lstrip())
            close = text.find(_CLOSE_TAG, after)
            nxt = text.find(_OPEN_TAG, after)
            if close >= 0 and (nxt < 0 or close < nxt):  # what follows up to the closing tag belongs to the block
                end = close + len(_CLOSE_TAG)
            found.append((start, end, call))
            i = end
            continue
        close = text.find(_CLOSE_TAG, body)
        stop = len(text) if close < 0 else close
        objs = _json_objects(text[body:stop])
        i = len(text) if close < 0 else close + len(_CLOSE_TAG)
        found.append((start, i, _as_call(objs[0][2]) if objs else None))
    return found


def _json_objects(text: str) -> list[tuple[int, int, Any]]:
    """Top-level JSON objects in free text: (start, end, value)."""
    dec = json.JSONDecoder()
    found, i = [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        found.append((i, end, value))
        i = end


def _as_call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if "function" in obj and isinstance(obj["function"], dict):
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return ToolCall(name=name, arguments=args)


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's end, padding and start tokens: stripped from a generation before it is parsed."""
    return [t for t in (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) if t]


def parse_completion(text: str, special_tokens: list[str] | None = None) -> tuple[Response, bool]:
    """(Response, well_formed). Tool calls in <tool_call> tags, or a bare {"name", "arguments"|"parameters"} object.

    well_formed is False when the text tried to call a tool but the call is not valid JSON.
    """
    for tok in special_tokens or []:
        if tok:
            text = text.replace(tok, "")
    text = text.strip()
    calls: list[ToolCall] = []
    well_formed = True
    spans = []
    for start, end, call in _tagged_calls(text):
        if call is None:
            well_formed = False
        else:
            calls.append(call)
        spans.append((start, end))
    if not spans:
        for start, end, value in _json_objects(text):
            call = _as_call(value)
            if call is not None:
                calls.append(call)
                spans.append((start, end))
    rest = text
    for start, end in reversed(spans):
        rest = rest[:start] + rest[end:]
    rest = rest.strip()
    if calls:
        return Response(content=rest or None, tool_calls=calls, finish_reason="tool_calls"), well_formed
    return Response(content=text, tool_calls=[], finish_reason="stop"), well_formed


def n_tokens(tokenizer: Any, text: str) -> int:
    """The tokens of `text` (no special tokens added), as `tokenizer(text)` counts them."""
    try:
        count = _COUNTERS.get(tokenizer)
    except TypeError:  # a tokenizer that takes no weak reference: no counter kept, the whole text counted
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if count is None:
        count = _COUNTERS[tokenizer] = _token_counter(tokenizer)
    return count(tokenizer, text)


# Per tokenizer, kept beside it rather than on it: a tokenizer still pickles (worker processes) after it has counted.
# A counter holds no reference to its tokenizer (it is handed one), so a tokenizer no longer used is freed with it.
_COUNTERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


SEGMENT_CACHE = 4096  # pieces of prompts between special tokens whose counts are kept, per tokenizer
_COUNT_PROBES = ("<|im_start|>system\nYou are a helpful agent.<|im_end|>\n<|im_start|>user\n  Where is order 8812?<|im_end|>",
                 "text<|endoftext|>more  <s>[INST] hi [/INST] </s>\n\n<start_of_turn>user\nZoë 🙂<end_of_turn>\n",
                 " leading space<|im_end|> trailing ", "<|im_start|><|im_end|>", "")


def _token_counter(tokenizer: Any):
    """count(tokenizer, text): tokens as `tokenizer(text, add_special_tokens=False)` counts them, fast where that is exact.

    A rendered prompt is mostly what the site's previous prompts held too: the instructions, the tool schemas, the
    earlier turns of the conversation. A fast (Rust) tokenizer splits its input at its added tokens (<|im_start|>,
    <|im_end|>, ...) before anything else and encodes each piece between them on its own, so the count of a prompt
    is the sum of its pieces' counts plus one per added token. The pieces' counts are kept (least recently used
    go past SEGMENT_CACHE), and a prompt costs only its new pieces: on `serve`'s request path counting the whole
    rendered prompt was ~0.85 ms of ~1 ms per request. Used only where that split is exactly the tokenizer's: every
    added token matched as written (not normalised, no stripping of neighbouring spaces, not single-word), no
    pre-tokenizer that treats the start of the whole text apart (Metaspace prepending only at the first piece),
    special tokens not split, and the sum equal to the whole count on probe texts. Elsewhere: the whole text, each time."""
    import functools

    def whole(tok: Any, text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    try:
        backend = tokenizer.backend_tokenizer
        added = list(backend.get_added_tokens_decoder().values())
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - a slow (Python) tokenizer, or one of another kind: count whole texts
        return whole
    if (getattr(tokenizer, "split_special_tokens", False) or not added
            or any(a.lstrip or a.rstrip or a.single_word or a.normalized for a in added)
            or '"prepend_scheme": "first"' in json.dumps(spec.get("pre_tokenizer"))):
        return whole
    splitter = re.compile("|".join(re.escape(a.content) for a in sorted(added, key=lambda a: -len(a.content))))

    @functools.lru_cache(maxsize=SEGMENT_CACHE)
    def piece(text: str) -> int:
        return len(backend.encode(text, add_special_tokens=False).ids)

    def by_pieces(_tok: Any, text: str) -> int:
        n, last = 0, 0
        for m in splitter.finditer(text):
            if m.start() > last:
                n += piece(text[last:m.start()])
            n, last = n + 1, m.end()
        return n + (piece(text[last:]) if last < len(text) else 0)

    probes = [*_COUNT_PROBES, *(f"{a.content}x {a.content}\n{a.content}" for a in added[:8])]
    if any(by_pieces(tokenizer, p) != whole(tokenizer, p) for p in probes):
        return whole
    return by_pieces


def _keep_carried(dropped: dict, after: list[dict]) -> list[dict]:
    """The messages after a dropped one, the dropped one's carried values (slmconvert.compaction) moved onto
    the next user message: they are what the prompt keeps of the history it no longer shows."""
    from slmconvert.compaction import CARRY_HEADER

    content = dropped.get("content")
    if not (isinstance(content, str) and content.startswith(CARRY_HEADER)):
        return after
    note = content.split("\n\n", 1)[0]
    nxt = next((i for i, m in enumerate(after) if m.get("role") == "user" and isinstance(m.get("content"), str)), None)
    if nxt is None:
        return after
    return after[:nxt] + [{**after[nxt], "content": note + "\n\n" + after[nxt]["content"]}] + after[nxt + 1:]


def fit_prompt(messages: list[dict], tools: list[dict] | None, tokenizer: Any, budget: int,
               native: bool, stats: Counter | None = None) -> tuple[str, int] | None:
    """The rendered prompt and its token count, fitted into `budget` tokens (`fit_messages`)."""
    fitted = fit_messages(messages, tools, tokenizer, budget, native, stats)
    return None if fitted is None else (fitted[2], fitted[3])


def fit_messages(messages: list[dict], tools: list[dict] | None, tokenizer: Any, budget: int, native: bool,
                 stats: Counter | None = None) -> tuple[list[dict], list[dict] | None, str, int] | None:
    """The messages and tools as fitted into `budget` tokens, their rendered prompt and its token count.
    Training, evaluation and serving share it, so a call is cut the same way everywhere.

    1. Older non-system turns are dropped (the last message always stays; values compaction carried
       move on to the next message).
    2. Still too long (long instructions, a huge last tool result): the longest message is cut in
       its middle, its head and tail kept with a marker saying how much was cut.
    3. Still too long: the tool descriptions are dropped (names and parameters stay).
    None only when even that does not fit. `stats` counts what was done (history_windowed,
    message_cut, tool_docs_dropped).
    """
    msgs = list(messages)
    prompt = render_prompt(tokenizer, msgs, tools, native)
    p_len = n_tokens(tokenizer, prompt)
    done: set[str] = set()
    while p_len > budget:
        droppable = [i for i, m in enumerate(msgs) if m.get("role") != "system"]
        if len(droppable) <= 1:
            break
        msgs = msgs[: droppable[0]] + _keep_carried(msgs[droppable[0]], msgs[droppable[0] + 1:])
        done.add("history_windowed")
        prompt = render_prompt(tokenizer, msgs, tools, native)
        p_len = n_tokens(tokenizer, prompt)
    for _ in range(6):
        if p_len <= budget:
            break
        i = max(range(len(msgs)), key=lambda k: len(msgs[k].get("content") or ""))
        content = msgs[i].get("content") or ""
        chars_per_token = max(len(prompt) / max(p_len, 1), 1.0)
        keep = len(content) - int((p_len - budget + 24) * chars_per_token * 1.15)
        if keep < 80:
            break
        head = keep * 2 // 3
        cut = len(content) - keep
        msgs[i] = {**msgs[i], "content": f"{content[:head]} …[{cut} characters cut]… {content[len(content) - (keep - head):]}"}
        done.add("message_cut")
        prompt = render_prompt(tokenizer, msgs, tools, native)
        p_len = n_tokens(tokenizer, prompt)
    if p_len > budget and tools:
        tools = [{**t, "function": {k: v for k, v in t["function"].items() if k != "description"}} for t in tools]
        done.add("tool_docs_dropped")
        prompt = render_prompt(tokenizer, msgs, tools, native)
        p_len = n_tokens(tokenizer, prompt)
    if stats is not None:
        stats.update(done)
    return (msgs, tools, prompt, p_len) if p_len <= budget else None
