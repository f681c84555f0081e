"""Schema-constrained decoding: once the SLM opens a tool call, only an offered tool with schema-valid arguments."""

import json

import pytest
import torch

from slmconvert.chat import parse_completion
from slmconvert.constrained import ToolGrammars, logits_processor
from slmconvert.invocation import Response
from slmconvert.policy import invalid_reason
from tests.conftest import tiny_llama

TOOLS = [{"type": "function", "function": {"name": "get_user", "parameters": {
    "type": "object", "properties": {"user_id": {"type": "string", "pattern": "^[a-z]+_[0-9]+$"},
                                     "verbose": {"type": "boolean"}},
    "required": ["user_id"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "cancel", "parameters": {
        "type": "object", "properties": {"reason": {"type": "string", "enum": ["change_of_plan", "airline_cancelled"]}},
        "required": ["reason"], "additionalProperties": False}}}]


class Script:
    """A logits processor that pushes the model hard toward one text, character by character (a model that
    'wants' to write it); the grammar after it decides what may actually be written."""

    def __init__(self, tok, text, start):
        self.ids = [tok.convert_tokens_to_ids(c) for c in text]
        self.start = start

    def __call__(self, input_ids, scores):
        k = input_ids.shape[1] - self.start
        if k < len(self.ids):
            scores[:, self.ids[k]] += 50.0
        return scores


def _scripted(model, tok, wanted: str, max_new_tokens: int, processors=()) -> str:
    """What the tiny model writes when pushed toward `wanted`, with these processors (None: skipped) after the push."""
    enc = tok(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt", add_special_tokens=False)
    procs = [Script(tok, wanted, enc["input_ids"].shape[1])] + [p for p in processors if p is not None]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=procs,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _generate(wanted: str, constrained: bool) -> str:
    model, tok = tiny_llama(seed=1)
    grammars = ToolGrammars(tok, model.config.vocab_size) if constrained else None
    return _scripted(model, tok, wanted, len(wanted) + 30,
                     [logits_processor(grammars, [grammars.for_tools(TOOLS)])] if constrained else [])


@pytest.mark.parametrize("wanted", [
    '<tool_call>{"name": "delete_user", "arguments": {"user_id": "mia_1"}}</tool_call>',  # a tool not offered
    '<tool_call>{"name": "cancel", "arguments": {"reason": "bored"}}</tool_call>',  # a value outside the enum
])
def test_a_model_that_wants_a_bad_call_can_only_write_a_valid_one(wanted):
    free = _generate(wanted, constrained=False)
    assert free.startswith(wanted[:30])  # unconstrained, the model writes what it wants
    resp, ok = parse_completion(free)
    assert not ok or invalid_reason(resp, TOOLS) is not None
    text = _generate(wanted, constrained=True)
    resp, ok = parse_completion(text)
    assert ok and resp.tool_calls, text  # it still calls a tool (the trigger was allowed) ...
    assert invalid_reason(resp, TOOLS) is None, text  # ... an offered one, with schema-valid arguments


@pytest.mark.parametrize("text,allowed", [
    ('<tool_call>{"name": "get_user", "arguments": {"user_id": "mia_1"}}</tool_call>', True),
    ('<tool_call>{"name": "get_user", "arguments": {"user_id": "mia_1", "verbose": true}}</tool_call>', True),
    ('<tool_call>{"name": "get_user", "arguments": {"user_id": 42}}</tool_call>', False),  # wrong type
    ('<tool_call>{"name": "get_user", "arguments": {"user_id": "Mia"}}</tool_call>', False),  # fails the pattern
    ('<tool_call>{"name": "get_user", "arguments": {}}</tool_call>', False),  # required argument missing
    ('<tool_call>{"name": "get_user", "arguments": {"user_id": "mia_1", "x": 1}}</tool_call>', False),  # unexpected
    ('<tool_call>{"name": "get_users", "arguments": {"user_id": "mia_1"}}</tool_call>', False),  # not offered
    ('Let me look that up. <tool_call>{"name": "cancel", "arguments": {"reason": "change_of_plan"}}</tool_call>', True),
])
def test_the_grammar_accepts_exactly_the_calls_the_schema_allows(text, allowed):
    import xgrammar as xgr

    model, tok = tiny_llama()
    matcher = xgr.GrammarMatcher(ToolGrammars(tok, model.config.vocab_size).for_tools(TOOLS))
    assert matcher.accept_string(text) is allowed
    resp, ok = parse_completion(text)
    assert (ok and invalid_reason(resp, TOOLS) is None) is allowed  # the grammar and the policy's check agree


@pytest.mark.parametrize("text,allowed", [
    ('<tool_call>{"name": "get_user", "arguments": {"user_id": "mia_1"}}</tool_call>', True),
    ('<tool_call>{"name": "get_user", "arguments": {"user_id": 42}}</tool_call>', False),
    ('<tool_call>{"name": "get_user", "arguments": {"user_id": "Mia"}}</tool_call>', False),
    ('<tool_call>{"name": "get_user", "arguments": {}}</tool_call>', False),
    ('<tool_call>{"name": "get_users", "arguments": {"user_id": "mia_1"}}</tool_call>', False),
    ('<tool_call>{"name": "cancel", "arguments": {"reason": "change_of_plan"}}</tool_call>\n'
     '<tool_call>{"name": "get_user", "arguments": {"user_id": "mia_1", "verbose": false}}</tool_call>', True),
    ('<tool_call>{"name": "cancel", "arguments": {"reason": "bored"}}</tool_call>', False),
])
def test_the_gbnf_llama_server_is_sent_allows_the_same_calls(text, allowed):
    """llama-server's lazy grammar starts at the trigger: from there, the GBNF serve sends allows exactly the calls
    the in-process grammar allows. Its language is checked with xgrammar (which reads GBNF); its dialect (names
    without underscores, no lookaheads, only the escapes llama.cpp knows) is checked here, as llama.cpp parses it."""
    import re

    import xgrammar as xgr

    from slmconvert.constrained import EngineGrammar

    fields = EngineGrammar().fields("gbnf", TOOLS)
    assert fields["grammar_lazy"] is True and fields["grammar_triggers"] == [{"type": 1, "value": "<tool_call>"}]
    grammar = fields["grammar"]
    assert all(re.fullmatch(r"[a-z0-9-]+", line.split(" ::= ")[0]) for line in grammar.splitlines())
    escapes = re.findall(r"\\(.)", grammar)  # each backslash with the character it escapes, left to right
    assert "(=" not in grammar and "Regex(" not in grammar and set(escapes) <= set('trn"\\[]xuU'), set(escapes)
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"])).compile_grammar(xgr.Grammar.from_ebnf(grammar))
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string(text) is allowed
    assert not allowed or matcher.is_completed()  # a whole answer: the grammar may end right there
    assert EngineGrammar().fields("gbnf", None) == {} and EngineGrammar().fields("none", TOOLS) == {}


def test_one_serve_sends_each_engine_its_own_grammar_for_the_same_tools():
    """Sites of one serve may use different engines: the grammar built for one kind is never handed to another."""
    from slmconvert.constrained import EngineGrammar

    g = EngineGrammar()
    assert set(g.fields("structural_tag", TOOLS)) == {"structured_outputs"}
    assert "grammar" in g.fields("gbnf", TOOLS) and set(g.fields("structural_tag", TOOLS)) == {"structured_outputs"}


def test_text_replies_stay_free_and_no_tools_means_no_constraint():
    text = _generate("Sure, one moment.", constrained=True)
    assert text.startswith("Sure, one moment.")
    resp, ok = parse_completion(text)
    assert ok and not resp.tool_calls
    model, tok = tiny_llama()
    g = ToolGrammars(tok, model.config.vocab_size)
    assert g.for_tools(None) is None and g.for_tools([]) is None and logits_processor(g, [None]) is None
    assert g.for_tools(TOOLS) is g.for_tools(json.loads(json.dumps(TOOLS)))  # compiled once per tool set
    assert invalid_reason(Response("x", []), TOOLS) is None


CALC = [{"type": "function", "function": {"name": "calc", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"},
                                     "unit": {"type": "string", "enum": ["usd", "eur"]},
                                     "terms": {"type": "array", "items": {"type": "number"}}},
    "required": ["expression"], "additionalProperties": False}}}]


def _inv(arguments, said: str = "?", tools=CALC, name: str = "calc"):
    from slmconvert.invocation import Invocation, Request, ToolCall

    return Invocation(id="x", session_id="s", source="log.jsonl", step=0, request=Request(messages=[{"role": "user", "content": said}], tools=tools),
                      response=Response(None, [ToolCall(name, arguments)]))


def test_bounds_cap_free_strings_and_lists_a_margin_above_what_the_llm_wrote():
    import xgrammar as xgr

    from slmconvert.constrained import argument_bounds, bound_schema

    bounds = argument_bounds([_inv({"expression": "2 + 3", "terms": [2, 3]}),
                              _inv({"expression": "120 * 0.15 + 40", "unit": "usd", "terms": [120, 0.15, 40]})])
    assert {k: v for k, v in bounds["calc"].items() if k.endswith(("#chars", "#items"))} == {
        "/expression#chars": 15, "/terms#items": 3, "/unit#chars": 3}
    schema = bound_schema(CALC[0]["function"]["parameters"], bounds["calc"])
    props = schema["properties"]
    assert props["expression"]["maxLength"] == 15 + 8 and props["terms"]["maxItems"] == 4
    assert "maxLength" not in props["unit"]  # an enum already bounds it
    assert "maxLength" not in CALC[0]["function"]["parameters"]["properties"]["expression"]  # the request's schema is not touched
    assert bound_schema({"type": "string"}, {})["maxLength"] == 256  # never written: the default cap
    assert bound_schema({"type": "string", "maxLength": 5}, {"#chars": 90})["maxLength"] == 5  # the schema's own limit wins

    model, tok = tiny_llama()
    grammar = ToolGrammars(tok, model.config.vocab_size).for_tools(CALC, bounds)

    def allowed(args):
        return xgr.GrammarMatcher(grammar).accept_string(
            '<tool_call>{"name": "calc", "arguments": ' + json.dumps(args) + "}</tool_call>")

    assert allowed({"expression": "1" * 23, "terms": [1, 2, 3, 4]})
    assert not allowed({"expression": "1" * 24})  # one character past the cap
    assert not allowed({"expression": "1", "terms": [1, 2, 3, 4, 5]})  # one item past the cap


def test_a_model_caught_in_a_loop_still_closes_a_valid_call_under_the_bounds():
    """Unbounded, a model that keeps writing '(' runs out of tokens inside the call (broken JSON, the LLM gets
    the call); bounded by what the LLM wrote in training, the grammar makes it close the string and the call."""
    from slmconvert.constrained import argument_bounds

    model, tok = tiny_llama(seed=1)
    prefix = '<tool_call>{"name": "calc", "arguments": {"expression": "'
    wanted = prefix + "(" * 200
    grammars = ToolGrammars(tok, model.config.vocab_size)
    bounds = argument_bounds([_inv({"expression": "(2 + 3) * 4"})])

    def run(b):
        return _scripted(model, tok, wanted, len(prefix) + 60, [logits_processor(grammars, [grammars.for_tools(CALC, b)])])

    loose = run(None)
    assert loose.startswith(prefix + "(" * 40) and not parse_completion(loose)[1]  # cut off inside the string
    text = run(bounds)
    resp, ok = parse_completion(text)
    assert ok and resp.tool_calls and invalid_reason(resp, CALC) is None, text
    assert resp.tool_calls[0].arguments["expression"] == "(" * 19  # the cap: 11 characters seen, 8 more


def test_a_model_that_repeats_itself_is_made_to_close_the_list_and_the_call():
    """Bounds do not stop a list of identical items short of its cap (the same passenger again and again until
    the budget runs out). The repeat guard bans the loop's steps once the span has come three times in a row;
    with the grammar, the model closes the list and the call within the budget."""
    from slmconvert.generation import RepeatGuard

    tools = [{"type": "function", "function": {"name": "tally", "parameters": {
        "type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}}},
        "required": ["items"], "additionalProperties": False}}}]
    model, tok = tiny_llama(seed=1)
    prefix = '<tool_call>{"name": "tally", "arguments": {"items": ['
    grammars = ToolGrammars(tok, model.config.vocab_size)

    def run(guard):
        return _scripted(model, tok, prefix + "17, " * 200, len(prefix) + 80,
                         [logits_processor(grammars, [grammars.for_tools(tools)]), guard])

    loose = run(None)
    assert loose.startswith(prefix + "17, " * 15) and not parse_completion(loose)[1]  # cut off inside the list
    guard = RepeatGuard()
    text = run(guard)
    resp, ok = parse_completion(text)
    assert guard.fired and ok and resp.tool_calls and invalid_reason(resp, tools) is None, text
    assert resp.tool_calls[0].arguments["items"][:6] == [17] * 6  # what came before the loop is kept


def test_the_repeat_guard_leaves_answers_without_a_loop_alone():
    from slmconvert.generation import RepeatGuard

    g = RepeatGuard()
    assert g.period(list(range(40))) is None
    assert g.period([5, 6, 7] * 7) is None  # 21 tokens: shorter than the 24-token minimum run
    assert g.period([1, 2] + [5, 6, 7, 8] * 6) == 4
    assert g.period([9] * 24) == 1
    scores = torch.zeros(1, 10)
    assert torch.equal(g(torch.tensor([[0, 1, 2, 3]]), scores.clone()), scores)  # the first call marks the prompt
    ids = torch.tensor([[0, 1, 2, 3] + [4, 5, 6] * 2])
    assert torch.equal(g(ids, scores.clone()), scores) and not g.fired


LOOKUP = [{"type": "function", "function": {"name": "get_booking", "parameters": {
    "type": "object", "properties": {"booking_id": {"type": "string"}, "note": {"type": "string"}},
    "required": ["booking_id"], "additionalProperties": False}}}]


def test_ids_the_llm_always_copied_can_only_be_copied_from_the_request():
    """An argument the LLM copied from the request in (nearly) every training call is decoded as one of the request's
    own tokens of that shape: a garbled or invented id cannot be written, a copied one can; free text stays free."""
    import xgrammar as xgr

    from slmconvert.constrained import argument_bounds, bounded_specs

    ids = ["QX7T2B", "M3KD9Z", "AB12CD", "ZZ9Y8X", "K2L3M4", "P0O9I8", "R5T6Y7", "U8I9O0", "W1E2R3", "N4B5V6", "C7X8Z9", "H1J2K3"]
    train = [_inv({"booking_id": b, "note": f"customer asked twice {i}"}, f"my booking is {b}, thanks", LOOKUP, "get_booking")
             for i, b in enumerate(ids)]
    bounds = argument_bounds(train, copy_share=0.95)["get_booking"]
    assert bounds["/booking_id#copy"] == 1 and "/note#copy" not in bounds  # the note was never one token of the request
    assert "/booking_id#copy" not in argument_bounds(train, copy_share=None)["get_booking"]  # switched off
    assert "/booking_id#copy" not in argument_bounds(train[:9], copy_share=0.95)["get_booking"]  # too few values to trust

    request = [{"role": "user", "content": "I have two bookings, 7GH2KQ and JJ81MN (the second is for my wife). Cancel one."},
               {"role": "tool", "content": json.dumps({"reservations": ["7GH2KQ", "JJ81MN"], "name": "Dana"})}]
    [(_, schema)] = bounded_specs(LOOKUP, {"get_booking": bounds}, request)
    assert schema["properties"]["booking_id"]["enum"] == ["7GH2KQ", "JJ81MN"]  # not "Cancel", "bookings", "Dana", "second"
    assert "enum" not in schema["properties"]["note"]
    [(_, unmarked)] = bounded_specs(LOOKUP, {"get_booking": bounds})  # no request at hand: only the length caps
    assert "enum" not in unmarked["properties"]["booking_id"]

    model, tok = tiny_llama()
    grammar = ToolGrammars(tok, model.config.vocab_size).for_tools(LOOKUP, {"get_booking": bounds}, request)

    def allowed(args):
        return xgr.GrammarMatcher(grammar).accept_string(
            '<tool_call>{"name": "get_booking", "arguments": ' + json.dumps(args) + "}</tool_call>")

    assert allowed({"booking_id": "JJ81MN"}) and allowed({"booking_id": "7GH2KQ", "note": "the wife's one"})
    assert not allowed({"booking_id": "JJ81NM"}) and not allowed({"booking_id": "QX7T2B"})  # garbled; another request's
    # a request without a token of that shape: the argument is only length-capped, never impossible to write
    [(_, none_fit)] = bounded_specs(LOOKUP, {"get_booking": bounds}, [{"role": "user", "content": "cancel my booking"}])
    assert "enum" not in none_fit["properties"]["booking_id"] and none_fit["properties"]["booking_id"]["maxLength"] >= 6


def test_a_tool_whose_copied_id_has_nothing_to_copy_is_not_offered():
    """The LLM copied the booking id from the conversation in every call. In a conversation that holds no id of that
    shape, the SLM could only invent one (on τ-bench it looked up the user `john_doe`, whom nobody named): the tool
    is not offered there, so the SLM replies or calls another tool, as the LLM did. With an id to copy it is offered;
    where it is the only tool, it stays, length-capped as before."""
    from slmconvert.constrained import argument_bounds, bounded_specs

    ids = ["QX7T2B", "M3KD9Z", "AB12CD", "ZZ9Y8X", "K2L3M4", "P0O9I8", "R5T6Y7", "U8I9O0", "W1E2R3", "N4B5V6", "C7X8Z9", "H1J2K3"]
    train = [_inv({"booking_id": b}, f"my booking is {b}, thanks", LOOKUP, "get_booking") for b in ids]
    bounds = argument_bounds(train, copy_share=0.95)
    listing = [{"type": "function", "function": {"name": "list_flights", "parameters": {
        "type": "object", "properties": {"day": {"type": "string"}}, "required": []}}}]
    hello = [{"role": "user", "content": "hello, I need to change my trip"}]
    assert [n for n, _ in bounded_specs(LOOKUP + listing, bounds, hello)] == ["list_flights"]
    with_id = [{"role": "user", "content": "it is booking 7GH2KQ"}]
    assert [n for n, _ in bounded_specs(LOOKUP + listing, bounds, with_id)] == ["get_booking", "list_flights"]
    [(name, alone)] = bounded_specs(LOOKUP, bounds, hello)
    assert name == "get_booking" and "enum" not in alone["properties"]["booking_id"] and alone["properties"]["booking_id"]["maxLength"] >= 6
    off = argument_bounds(train, copy_share=None)  # copies not enforced: every tool offered, as before
    assert [n for n, _ in bounded_specs(LOOKUP + listing, off, hello)] == ["get_booking", "list_flights"]

    model, tok = tiny_llama()
    grammar = ToolGrammars(tok, model.config.vocab_size).for_tools(LOOKUP + listing, bounds, hello)
    import xgrammar as xgr

    assert not xgr.GrammarMatcher(grammar).accept_string('<tool_call>{"name": "get_booking", "arguments": {"booking_id": "JOHN01"}}</tool_call>')
    assert xgr.GrammarMatcher(grammar).accept_string('<tool_call>{"name": "list_flights", "arguments": {"day": "today"}}</tool_call>')


def test_a_rare_tool_copies_an_id_the_way_the_frequent_tools_with_that_argument_do():
    """A write the LLM made twice in training is too little evidence of its own that its `booking_id` is copied, but the
    lookups copied theirs in every one of 12 calls: the rare tool's id is decoded as a copy of the request's ids too (and
    is not offered where the request holds none). A tool that once wrote an id it had not copied borrows nothing."""
    from slmconvert.constrained import argument_bounds, bounded_specs

    ids = ["QX7T2B", "M3KD9Z", "AB12CD", "ZZ9Y8X", "K2L3M4", "P0O9I8", "R5T6Y7", "U8I9O0", "W1E2R3", "N4B5V6", "C7X8Z9", "H1J2K3"]
    tools = LOOKUP + [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"booking_id": {"type": "string"}, "seat": {"type": "string"}},
        "required": ["booking_id", "seat"]}}} for n in ("change_seat", "guess_seat")]
    train = [_inv({"booking_id": b}, f"my booking is {b}, thanks", tools, "get_booking") for b in ids]
    train += [_inv({"booking_id": b, "seat": "14C"}, f"move {b} to an aisle seat", tools, "change_seat") for b in ids[:2]]
    train += [_inv({"booking_id": "NEW001", "seat": "2A"}, f"move {ids[2]} forward", tools, "guess_seat")]  # not a copy
    bounds = argument_bounds(train, copy_share=0.9)  # 12 of the other tools' 13 values were copies
    # two rare tools borrow from the same evidence, not from each other's borrowings: the order of the log is no matter
    rare = train + [_inv({"booking_id": ids[5]}, f"cancel {ids[5]}", tools + [{"type": "function", "function": {
        "name": "cancel_booking", "parameters": {"type": "object", "properties": {"booking_id": {"type": "string"}}}}}],
        "cancel_booking")]
    assert argument_bounds(rare, copy_share=0.9) == argument_bounds(rare[::-1], copy_share=0.9)
    assert argument_bounds(rare, copy_share=0.9)["cancel_booking"]["/booking_id#copy"] == 1
    assert bounds["change_seat"]["/booking_id#copy"] == 1 and bounds["change_seat"]["/booking_id#copy_borrowed"] == 12
    assert "/seat#copy" not in bounds["change_seat"]  # no other tool has a seat to lean on
    assert "/booking_id#copy" not in bounds["guess_seat"]
    assert "/booking_id#copy" not in argument_bounds(train[:8] + train[12:], copy_share=0.9)["change_seat"]  # too little to borrow
    assert "/booking_id#copy" not in argument_bounds(train, copy_share=0.95)["change_seat"]  # the others copied too rarely

    specs = dict(bounded_specs(tools, bounds, [{"role": "user", "content": "put booking 7GH2KQ in seat 3B"}]))
    assert specs["change_seat"]["properties"]["booking_id"]["enum"] == ["7GH2KQ"]
    assert "enum" not in specs["change_seat"]["properties"]["seat"] and "enum" not in specs["guess_seat"]["properties"]["booking_id"]
    assert "change_seat" not in dict(bounded_specs(tools, bounds, [{"role": "user", "content": "any seat by a window?"}]))


def test_external_engines_are_sent_the_same_copy_constraint():
    """vLLM's structural tag and llama-server's GBNF carry the request's copyable tokens as the in-process grammar does."""
    import xgrammar as xgr

    from slmconvert.constrained import EngineGrammar, argument_bounds

    train = [_inv({"booking_id": b}, f"booking {b} please", LOOKUP, "get_booking")
             for b in ["QX7T2B", "M3KD9Z", "AB12CD", "ZZ9Y8X", "K2L3M4", "P0O9I8", "R5T6Y7", "U8I9O0", "W1E2R3", "N4B5V6"]]
    bounds = {"get_booking": argument_bounds(train, copy_share=0.95)["get_booking"]}
    request = [{"role": "user", "content": "Is 7GH2KQ confirmed?"}]
    tag = json.loads(EngineGrammar().fields("structural_tag", LOOKUP, bounds, request)["structured_outputs"]["structural_tag"])
    assert tag["format"]["tags"][0]["content"]["json_schema"]["properties"]["booking_id"]["enum"] == ["7GH2KQ"]
    gbnf = EngineGrammar().fields("gbnf", LOOKUP, bounds, request)["grammar"]
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo(["a"])).compile_grammar(xgr.Grammar.from_ebnf(gbnf)))
    call = '<tool_call>{"name": "get_booking", "arguments": {"booking_id": "%s"}}</tool_call>'
    assert matcher.accept_string(call % "7GH2KQ")
    matcher.reset()
    assert not matcher.accept_string(call % "7GH2KR")


def _lookup_session(ids: list[str], name: str = "get_booking", repeat_last: bool = False):
    """An invocation whose conversation already looked up every id but the last, and whose LLM answer looks up
    the last one (or, `repeat_last`, the one before again)."""
    from slmconvert.invocation import Invocation, Request, ToolCall

    msgs = [{"role": "user", "content": "my bookings are " + ", ".join(ids)}]
    for i, b in enumerate(ids[:-1]):
        msgs += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": {"booking_id": b}}}]},
                 {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"booking_id": b, "seats": 1})}]
    nxt = ids[-2] if repeat_last else ids[-1]
    return Invocation(id="x", session_id="s", source="log.jsonl", step=0, request=Request(messages=msgs, tools=BOOKING),
                      response=Response(None, [ToolCall(name, {"booking_id": nxt})]))


BOOKING = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object", "properties": {"booking_id": {"type": "string"}}, "required": ["booking_id"],
    "additionalProperties": False}}} for n in ("get_booking", "rebook")]


def test_a_lookup_the_llm_never_repeats_cannot_be_made_again_with_the_same_id():
    """A small model that sees its last call and its result tends to make the same call again. Where the site's LLM
    (almost) never repeated a one-argument call of a tool, the grammar offers that tool only the ids the conversation
    has not called it with yet; a tool the LLM did repeat (a retried write) keeps them all."""
    import xgrammar as xgr

    from slmconvert.constrained import argument_bounds, bounded_specs

    ids = ["QX7T2B", "M3KD9Z", "AB12CD", "ZZ9Y8X", "K2L3M4", "P0O9I8", "R5T6Y7", "U8I9O0", "W1E2R3", "N4B5V6", "C7X8Z9", "H1J2K3"]
    train = [_lookup_session(ids[: i + 2]) for i in range(11)]
    train += [_lookup_session(ids[: i + 2], "rebook", repeat_last=i % 3 == 0) for i in range(11)]  # 4 of 11 retried
    bounds = argument_bounds(train, copy_share=0.95, repeat_share=0.02)
    assert (bounds["get_booking"]["#calls"], bounds["get_booking"]["#repeats"]) == (11, 0)
    assert bounds["get_booking"]["#norepeat"] == 1 and "#norepeat" not in bounds["rebook"]
    assert "#norepeat" not in argument_bounds(train, copy_share=0.95)["get_booking"]  # switched off
    assert "#norepeat" not in argument_bounds(train[:9], copy_share=0.95, repeat_share=0.02)["get_booking"]  # too few calls

    # as serve receives it: arguments as a JSON string; 7GH2KQ already looked up, JJ81MN not yet
    request = [{"role": "user", "content": "I have two bookings, 7GH2KQ and JJ81MN."},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_booking", "arguments": '{"booking_id": "7GH2KQ"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": '{"booking_id": "7GH2KQ", "seats": 2}'}]
    specs = dict(bounded_specs(BOOKING, bounds, request))
    assert specs["get_booking"]["properties"]["booking_id"]["enum"] == ["JJ81MN"]
    assert specs["rebook"]["properties"]["booking_id"]["enum"] == ["7GH2KQ", "JJ81MN"]  # its LLM did retry
    model, tok = tiny_llama()
    grammar = ToolGrammars(tok, model.config.vocab_size).for_tools(BOOKING, bounds, request)

    def allowed(name, booking):
        return xgr.GrammarMatcher(grammar).accept_string(
            f'<tool_call>{{"name": "{name}", "arguments": {{"booking_id": "{booking}"}}}}</tool_call>')

    assert allowed("get_booking", "JJ81MN") and not allowed("get_booking", "7GH2KQ") and allowed("rebook", "7GH2KQ")
    from slmconvert.constrained import EngineGrammar

    tag = json.loads(EngineGrammar().fields("structural_tag", BOOKING, bounds, request)["structured_outputs"]["structural_tag"])
    assert tag["format"]["tags"][0]["content"]["json_schema"]["properties"]["booking_id"]["enum"] == ["JJ81MN"]  # vLLM too

    # both looked up: get_booking is not offered at all (a text reply or another tool); with no other tool, it stays
    both = request + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "get_booking", "arguments": '{"booking_id": "JJ81MN"}'}}]},
        {"role": "tool", "tool_call_id": "c2", "content": '{"booking_id": "JJ81MN", "seats": 1}'}]
    assert [n for n, _ in bounded_specs(BOOKING, bounds, both)] == ["rebook"]
    [(_, alone)] = bounded_specs(BOOKING[:1], bounds, both)
    assert alone["properties"]["booking_id"]["enum"] == ["7GH2KQ", "JJ81MN"]


def test_an_id_taken_from_an_e_mail_address_counts_as_copied():
    """An LLM that reads the user id off the e-mail's local part copied it: the id is offered to the SLM as a copy
    (an enum of the request's pieces), not left to be re-typed."""
    from slmconvert.constrained import argument_bounds, bounded_specs, request_sources

    assert {"dana_kim_4411", "example.com"} <= set(request_sources([{"role": "user", "content": "It's dana_kim_4411@example.com."}]))
    users = [f"user_{i}_{1000 + i}" for i in range(10)]
    train = [_inv({"booking_id": u}, f"my e-mail is {u}@example.com", LOOKUP, "get_booking") for u in users]
    bounds = argument_bounds(train, copy_share=0.95)
    assert bounds["get_booking"]["/booking_id#copied"] == 10 and bounds["get_booking"]["/booking_id#copy"] == 1
    [(_, schema)] = bounded_specs(LOOKUP, bounds, [{"role": "user", "content": "Sure: ann_lee_2020@mail.org"}])
    assert schema["properties"]["booking_id"]["enum"] == ["ann_lee_2020"]


def test_a_copy_comes_from_where_the_llm_copied_it_from():
    """The LLM took user ids from what the user wrote or from a `user_id` field, never from the payment methods that
    have the same shape: the SLM may copy a user id only from there, so a gift-card id is not a user id to it."""
    from slmconvert.constrained import argument_bounds, bounded_specs, copy_sources

    users = [f"ann_lee_{1000 + i}" for i in range(12)]
    train = [_inv({"booking_id": u}, f"I am {u}", LOOKUP, "get_booking") for u in users]
    bounds = argument_bounds(train, copy_share=0.95)
    assert copy_sources(bounds["get_booking"], "/booking_id") == {"user-text"}
    request = [{"role": "user", "content": "my id is bo_chan_7070"},
               {"role": "tool", "content": json.dumps({"payment_methods": {"gift_card_7344": {"amount": 20}},
                                                       "user_id": "bo_chan_7070", "friend": "cy_dale_1234"})}]
    [(_, schema)] = bounded_specs(LOOKUP, bounds, request)
    assert schema["properties"]["booking_id"]["enum"] == ["bo_chan_7070"]
    # a policy written before sources were counted: a copy of the right shape from anywhere
    before = {"get_booking": {k: v for k, v in bounds["get_booking"].items() if "#copy_src:" not in k}}
    [(_, anywhere)] = bounded_specs(LOOKUP, before, request)
    assert anywhere["properties"]["booking_id"]["enum"] == ["bo_chan_7070", "cy_dale_1234", "gift_card_7344"]


class Prefer:
    """A logits processor that makes one character a little likelier everywhere: the way out a model takes when
    its first choice is banned."""

    def __init__(self, tok, char, boost=10.0):
        self.id, self.boost = tok.convert_tokens_to_ids(char), boost

    def __call__(self, input_ids, scores):
        scores[:, self.id] += self.boost
        return scores


def test_a_counting_loop_is_broken_and_the_call_closes_within_the_budget():
    """A loop whose numbers count up ("7. The id is 12307. 8. The id is 12308. …") is never verbatim, so the plain
    guard lets it run to the budget: broken JSON. With the tokenizer's digits the guard reads each number as one unit,
    sees the span come five times with a number going up by one, and bans the span's steps: the string closes and the
    call is valid, with what came before the loop and the five counted copies kept."""
    from slmconvert.generation import RepeatGuard, digit_tokens

    tools = [{"type": "function", "function": {"name": "note", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"], "additionalProperties": False}}}]
    model, tok = tiny_llama(seed=1)
    prefix = '<tool_call>{"name": "note", "arguments": {"text": "Seen: '
    loop = "".join(f"{i}. The id is {12300 + i}. " for i in range(1, 80))
    grammars = ToolGrammars(tok, model.config.vocab_size)

    def run(guard):
        return _scripted(model, tok, prefix + loop, len(prefix) + 300,
                         [Prefer(tok, '"'), logits_processor(grammars, [grammars.for_tools(tools)]), guard])

    plain = RepeatGuard()
    loose = run(plain)
    assert loose.startswith(prefix + loop[:250]) and not parse_completion(loose)[1] and not plain.fired  # cut off
    guard = RepeatGuard(digits=digit_tokens(tok))
    text = run(guard)
    resp, ok = parse_completion(text)
    assert guard.counting and guard.fired and ok and resp.tool_calls and invalid_reason(resp, tools) is None, text
    assert resp.tool_calls[0].arguments["text"] == "Seen: " + loop[: loop.index(" 6. ")]  # closed after the fifth


def test_the_counting_guard_leaves_lists_whose_numbers_do_not_count_alone():
    """Items that differ only in their numbers (flights, amounts) are a list, not a loop, unless a number counts up by
    one through five copies in a row; a counting list of four items is left alone too."""
    from slmconvert.generation import RepeatGuard, digit_tokens

    _, tok = tiny_llama()
    g = RepeatGuard(digits=digit_tokens(tok))
    ids = lambda s: [tok.convert_tokens_to_ids(c) for c in s]  # noqa: E731 — the character tokenizer
    flights = "".join(f'{{"flight": "HAT{n:03d}", "date": "2024-05-{d:02d}"}}, ' for n, d in
                      [(80, 28), (76, 28), (255, 30), (123, 30), (17, 2), (305, 4), (42, 4)])
    assert g.counting_period(ids(flights)) is None
    assert g.counting_period(ids("".join(f"{i}. The id is {12300 + i}. " for i in range(1, 5)))) is None  # four copies
    cycle = g.counting_period(ids("".join(f"{i}. The id is {12300 + i}. " for i in range(1, 6))))
    assert cycle is not None and cycle.count(-1) == 2  # five copies: the span, its two numbers as units
    assert g.counting_period(ids("".join(f"{i}. The id is {12300 + i}. " for i in range(1, 6)))[:-1]) is None  # unfinished
