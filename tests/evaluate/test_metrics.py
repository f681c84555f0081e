"""Every metric on hand-made cases, including the BFCL-style equivalences (and the non-equivalences)."""

import pytest

from slmconvert.invocation import Response, ToolCall
from slmconvert.metrics import Prediction, arguments_match, headline, metrics, score

TOOLS = [{"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "required": ["flight", "seats"],
    "properties": {"flight": {"type": "string"}, "seats": {"type": "integer"}, "price": {"type": "number"},
                   "insurance": {"type": "string", "enum": ["yes", "no"], "default": "no"},
                   "extras": {"type": "array", "items": {"type": "string"}},
                   "passenger": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}}}}}]


def call(**args):
    return Response(None, [ToolCall("book", args)])


def pred(resp, ok=True):
    return Prediction(resp, ok)


EXPECTED = call(flight="HAT123", seats=2, price=199.0, passenger={"name": "Ana Ruiz", "age": 30})


@pytest.mark.parametrize("got,why", [
    (call(passenger={"age": 30, "name": "Ana Ruiz"}, price=199.0, seats=2, flight="HAT123"), "key order"),
    (call(flight="HAT123", seats=2.0, price=199, passenger={"name": "Ana Ruiz", "age": 30}), "int vs float"),
    (call(flight="  hat123 ", seats=2, price=199.0, passenger={"name": "ana  ruiz", "age": 30}), "case and whitespace"),
    (call(flight="HAT123", seats=2, price=199.0, passenger={"name": "Ana Ruiz", "age": 30}, insurance="no"),
     "an optional argument given at its schema default"),
])
def test_bfcl_equivalences_are_not_errors(got, why):
    s = score(EXPECTED, pred(got), TOOLS)
    assert s["function_name"] == 1.0 and s["arguments"] == 1.0, why
    assert s["argument_values"] == 1.0, why


@pytest.mark.parametrize("got,why", [
    (call(flight="HAT123", price=199.0, passenger={"name": "Ana Ruiz", "age": 30}), "missing required argument"),
    (call(flight="HAT123", seats=2, price=199.0, passenger={"name": "Ana Ruiz", "age": 30}, insurance="yes"),
     "unexpected argument with a non-default value"),
    (call(flight="HAT123", seats="2", price=199.0, passenger={"name": "Ana Ruiz", "age": 30}), "a string for an integer"),
    (call(flight="HAT124", seats=2, price=199.0, passenger={"name": "Ana Ruiz", "age": 30}), "a different value"),
    (call(flight="HAT123", seats=2, price=199.0, passenger={"name": "Ana Ruiz", "age": "30"}), "wrong type, nested"),
    (call(flight="HAT123", seats=True, price=199.0, passenger={"name": "Ana Ruiz", "age": 30}), "a bool is not a number"),
])
def test_real_differences_are_errors(got, why):
    s = score(EXPECTED, pred(got), TOOLS)
    assert s["function_name"] == 1.0 and s["arguments"] == 0.0, why


def test_per_argument_accuracy_counts_each_argument():
    got = call(flight="HAT123", seats=3, price=199.0, passenger={"name": "Ana Ruiz", "age": 30})
    assert score(EXPECTED, pred(got), TOOLS)["argument_values"] == pytest.approx(3 / 4)
    # an extra, non-default argument is one more error in the denominator
    got = call(flight="HAT123", seats=2, price=199.0, passenger={"name": "Ana Ruiz", "age": 30}, insurance="yes")
    assert score(EXPECTED, pred(got), TOOLS)["argument_values"] == pytest.approx(4 / 5)
    # the wrong function: every expected argument is wrong
    wrong = Response(None, [ToolCall("cancel", {"flight": "HAT123"})])
    s = score(EXPECTED, pred(wrong), TOOLS)
    assert s["function_name"] == 0.0 and s["argument_values"] == 0.0


def test_parallel_calls_match_in_any_order_and_lists_keep_order():
    a, b = ToolCall("book", {"flight": "A", "seats": 1}), ToolCall("book", {"flight": "B", "seats": 1})
    assert score(Response(None, [a, b]), pred(Response(None, [b, a])), TOOLS)["arguments"] == 1.0
    assert score(Response(None, [a, b]), pred(Response(None, [a])), TOOLS)["function_name"] == 0.0
    schema = {**TOOLS[0]["function"]["parameters"], "required": []}
    assert arguments_match({"extras": ["bag", "meal"]}, {"extras": ["BAG", "meal"]}, schema)
    assert not arguments_match({"extras": ["bag", "meal"]}, {"extras": ["meal", "bag"]}, schema)


def test_call_agreement_exact_match_and_valid_json():
    text = Response("Your flight is booked.")
    s = score(text, pred(Response("Your flight is booked.")), TOOLS)
    assert s["call_agreement"] == 1.0 and s["exact_match"] == 1.0 and s["function_name"] is None
    assert s["valid_json"] is None  # it did not try to call a tool
    s = score(text, pred(call(flight="X", seats=1)), TOOLS)
    assert s["call_agreement"] == 0.0 and s["exact_match"] == 0.0 and s["chrf"] == 0.0
    broken = Prediction(Response("<tool_call>{\"name\": \"book\", ", []), well_formed=False)
    assert score(EXPECTED, broken, TOOLS)["valid_json"] == 0.0
    assert score(EXPECTED, pred(EXPECTED), TOOLS)["exact_match"] == 1.0


def test_text_metrics_order_replies_by_closeness():
    ref = Response("Your reservation ABC123 has been cancelled and the refund goes to your card.")
    close = score(ref, pred(Response("Reservation ABC123 is cancelled; the refund goes back to your card.")), None)
    far = score(ref, pred(Response("Hello! How can I help you today?")), None)
    for m in ("chrf", "rouge_l"):
        assert 0.0 <= far[m] < close[m] <= 1.0, m
    assert headline(close) > headline(far)


def test_registry_lists_every_metric_and_unknown_names_fail():
    names = set(metrics.names())
    assert {"call_agreement", "function_name", "arguments", "argument_values", "exact_match", "valid_json", "chrf", "rouge_l"} <= names
    with pytest.raises(Exception, match="known|unknown|Unknown"):
        metrics.get("bleu-9000")
