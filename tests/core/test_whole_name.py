"""evaluate.tool_choice=whole_name: a call names the offered tool the model finds most probable as a whole."""

import pytest
import torch

from slmconvert.chat import parse_completion
from slmconvert.constrained import ToolGrammars, opening_text
from slmconvert.generation import choose_openings, generate, name_tokens
from tests.conftest import tiny_llama

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
         for n in ("get", "up_a", "up_b")]
PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
LONGER = "<|im_start|>user\nhello there, please<|im_end|>\n<|im_start|>assistant\n"
TEXT = "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n"  # answered in text


@pytest.fixture(scope="module")
def trained():
    """A tiny model taught that `TEXT` is answered in text, and that this prompt is answered by `get` 40% of the time, `up_a` 30%, `up_b` 30%: token by
    token `u` (60%) beats `g` (40%), so greedy decoding goes into the `up_…` group, though `get` is the likeliest tool."""
    model, tok = tiny_llama(seed=3, hidden=48)
    tok.padding_side = "left"
    texts = [p + opening_text(n) + "{}}</tool_call><|im_end|>" for p in (PROMPT, LONGER)
             for n in ["get"] * 8 + ["up_a"] * 6 + ["up_b"] * 6] + [TEXT + "ok, bye<|im_end|>"] * 10
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(300):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok


def _name(text: str) -> str:
    resp, ok = parse_completion(text)
    assert ok and resp.tool_calls, text
    return resp.tool_calls[0].name


def test_greedy_goes_into_the_group_and_whole_name_takes_the_likeliest_tool(trained):
    model, tok = trained
    grammars = ToolGrammars(tok, model.config.vocab_size)
    g = grammars.for_tools(TOOLS)
    greedy = generate(model, tok, [PROMPT], max_new_tokens=60, grammars=grammars, constraints=[g])[0]
    assert _name(greedy.text) in ("up_a", "up_b")
    whole = generate(model, tok, [PROMPT], max_new_tokens=60, grammars=grammars, constraints=[g],
                     tool_names=[["get", "up_a", "up_b"]])[0]
    assert _name(whole.text) == "get"
    assert whole.text.endswith("</tool_call>")  # the rest of the call is still decoded under the grammar
    assert len(whole.logprobs) == whole.new_tokens  # the confidence signals still read the model's own probabilities
    # the whole-name choice is only among the offered tools: without `get`, it is one of the others
    only = generate(model, tok, [PROMPT], max_new_tokens=60, grammars=grammars,
                    constraints=[grammars.for_tools(TOOLS[1:])], tool_names=[["up_a", "up_b"]])[0]
    assert _name(only.text) in ("up_a", "up_b")


def test_the_choice_is_the_same_in_a_left_padded_batch_as_alone_and_matches_scoring_by_hand(trained):
    model, tok = trained
    tok.padding_side = "left"
    names = [["get", "up_a", "up_b"], ["up_b", "get", "up_a"]]
    enc = tok([PROMPT, LONGER], return_tensors="pt", padding=True, add_special_tokens=False)
    both = choose_openings(model, tok, enc, names)
    for i, p in enumerate([PROMPT, LONGER]):
        alone = choose_openings(model, tok, tok([p], return_tensors="pt", add_special_tokens=False), [names[i]])
        assert both[i] == alone[0]
        # by hand: the whole opening's log-probability, one full forward pass per tool, no cache
        scores = {}
        for n in names[i]:
            ids = tok(p + tok.decode(name_tokens(tok, n)), return_tensors="pt", add_special_tokens=False)["input_ids"]
            start = len(tok(p, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            scores[n] = sum(float(lp[j - 1, ids[0, j]]) for j in range(start, ids.shape[1]))
        best = max(scores, key=scores.get)
        assert both[i] == name_tokens(tok, best), (scores, i)
        assert tok.decode(both[i]).endswith(f'"{best}"')  # forced through the name's closing quote, no further


def test_a_text_reply_and_a_single_tool_are_left_to_greedy_decoding(trained):
    model, tok = trained
    enc = tok([PROMPT], return_tensors="pt", add_special_tokens=False)
    assert choose_openings(model, tok, enc, [None]) == [None]  # no tools offered
    assert choose_openings(model, tok, enc, [["get"]]) == [None]  # one tool: nothing to choose
    # a prompt the model answers in text (its first token is not the call's): no opening is forced
    other = tok([TEXT], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        first = int(model(**other).logits[0, -1].argmax())
    assert first != name_tokens(tok, "get")[0]  # the premise: greedy decoding does not open a call here
    assert choose_openings(model, tok, other, [["get", "up_a"]]) == [None]
