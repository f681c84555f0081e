"""Surrogates: consistent within a session, different across sessions, deterministic, same shape."""

import json
import re

from slmconvert.invocation import ToolCall
from slmconvert.scrub.surrogates import SurrogateFactory, luhn_valid
from tests.scrub.conftest import make_inv


def _session(session, n=0):
    msgs = [{"role": "user", "content": "My user id is mia_li_3668 and my email is mia.li@example.com"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "id": "a", "function": {"name": "get_user", "arguments": {"user_id": "mia_li_3668"}}}]},
            {"role": "tool", "content": '{"user_id": "mia_li_3668", "name": {"first_name": "Mia", "last_name": "Li"}, "email": "mia.li@example.com"}'}]
    return make_inv(msgs, tool_calls=[ToolCall("update_email", {"user_id": "mia_li_3668", "email": "mia.li@example.com"})], session=session, n=n)


def test_same_value_same_fake_everywhere_in_a_session(scrub):
    (out,), _ = scrub([_session("s1")], seed=5)
    args = out.response.tool_calls[0].arguments
    uid, email = args["user_id"], args["email"]
    assert uid != "mia_li_3668" and re.fullmatch(r"[a-z]+_[a-z]+_\d{4}", uid)  # same shape
    assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", email) and email != "mia.li@example.com"
    prompt = " ".join(m["content"] or str(m.get("tool_calls")) for m in out.request.messages)
    assert prompt.count(uid) == 3 and prompt.count(email) == 2  # copyable from the context
    assert "mia_li_3668" not in prompt and "mia.li@example.com" not in prompt


def test_other_sessions_get_other_fakes_and_runs_are_deterministic(scrub):
    out1, _ = scrub([_session("s1"), _session("s2", n=1)], seed=5)
    out2, _ = scrub([_session("s1"), _session("s2", n=1)], seed=5)
    ids = [o.response.tool_calls[0].arguments["user_id"] for o in out1]
    assert ids[0] != ids[1]
    assert ids == [o.response.tool_calls[0].arguments["user_id"] for o in out2]


def test_fakes_keep_type_and_shape():
    f = SurrogateFactory(b"k" * 32)
    card = f("s", "CREDIT_CARD", "4111-1111-1111-1111")
    assert re.fullmatch(r"4\d{3}-\d{4}-\d{4}-\d{4}", card) and luhn_valid(card) and card != "4111-1111-1111-1111"
    iban = f("s", "IBAN_CODE", "GB82WEST12345698765432")
    digits = "".join(str(int(c, 36)) for c in iban[4:] + iban[:4])
    assert iban.startswith("GB") and len(iban) == 22 and int(digits) % 97 == 1
    phone = f("s", "PHONE_NUMBER", "(415) 555-0132")
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", f("s", "DATE_OF_BIRTH", "1990-04-05"))
    assert f("s", "STREET_ADDRESS", "Suite 217").startswith("Suite ")
    key = f("s", "API_KEY", "sk-proj-abcdefghijklmnopqrstuvwxyz123456")
    assert key.startswith("sk-proj-") and len(key) == len("sk-proj-abcdefghijklmnopqrstuvwxyz123456") and "abcdefghijklmnop" not in key
    assert f("s", "PERSON", "Mia") == f("s", "PERSON", "Mia") != f("t", "PERSON", "Mia")


def test_capitalised_common_words_are_not_taken_for_names(scrub):
    msgs = [{"role": "system", "content": "## Book flight\nThe agent must check the gift card balance. Arrival times are local."},
            {"role": "user", "content": "Book flight please. My name is Ivan Smith. Gift Card: yes"}]
    (out,), _ = scrub([make_inv(msgs, content="Sure, Ivan.")], surrogates="placeholder")
    system = out.request.messages[0]["content"]
    assert system == msgs[0]["content"]
    assert "Ivan" not in out.request.messages[1]["content"] and out.response.content == "Sure, <PERSON_1>."
    assert "Book flight please" in out.request.messages[1]["content"] and "Gift Card" in out.request.messages[1]["content"]


def test_name_shaped_organisations_are_treated_as_names_but_real_organisations_are_not():
    from slmconvert.scrub.spans import looks_like_person as _looks_like_person

    assert _looks_like_person("Tomomi Nishiyama") and _looks_like_person("Faina D. Yefremova")
    assert not _looks_like_person("Palantir Technologies") and not _looks_like_person("Bank of America")
    assert not _looks_like_person("Microbilt") and not _looks_like_person("IBM Research")


def test_a_name_in_a_system_prompt_shared_by_many_sessions_is_template_vocabulary(tmp_path):
    """The company named in every conversation's system prompt is not personal data: replacing it per session would
    give each session a different system prompt (hiding the static template) and teach the SLM random names."""
    from slmconvert.collect.stage import run
    from slmconvert.demo import generate
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace
    from tests.conftest import stage_config

    generate(tmp_path / "logs.jsonl", sessions=30, seed=2)
    ws = Workspace(tmp_path / "ws")
    run(stage_config(ws.root, "scrub.enabled=true", f"collect.paths=[{tmp_path / 'logs.jsonl'}]"), ws)
    invs = load_invocations(ws, "collect")
    shop = [i for i in invs if "ShopAssist" in (i.request.messages[0].get("content") or "")]
    assert len({i.session_id for i in shop}) >= 5
    # one template up to the date, and the company name intact
    prompts = {i.request.messages[0]["content"].split("Today is")[0] for i in shop}
    assert len(prompts) == 1 and "Northwind Outfitters" in prompts.pop()
    report = json.loads((ws.stage_dir("collect") / "scrub_report.json").read_text())
    assert "Northwind Outfitters" in report["template_values_kept"]
    # the customers' names are still replaced: none of the raw log's names survive
    raw = [json.loads(line) for line in open(tmp_path / "logs.jsonl")]
    raw_names = set()
    for r in raw:
        for m in r["request"]["messages"]:
            if m["role"] == "tool" and '"customer"' in m["content"]:
                raw_names.add(json.loads(m["content"])["customer"]["name"])
    stored = json.dumps([i.to_dict() for i in invs])
    assert raw_names and not [n for n in raw_names if n in stored]
