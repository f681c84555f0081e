"""Golden before/after: literal text in, literal text out (typed placeholders, so the output is exact)."""

import json

from slmconvert.invocation import ToolCall
from tests.scrub.conftest import make_inv

USER = "Hi, I'm John Smith, email john.smith@acme.com, call +1 415-555-0132. My card is 4111 1111 1111 1111."
TOOL_RESULT = ('{"name": {"first_name": "John", "last_name": "Smith"}, "email": "john.smith@acme.com", "dob": "1990-04-05", '
               '"flight": "HAT136", "address": {"address1": "975 Sunset Drive", "city": "Austin", "zip": "78750"}}')
CONVERSATION = [
    {"role": "system", "content": "You are a travel agent."},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "get_user", "arguments": {"email": "john.smith@acme.com"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": TOOL_RESULT},
]


def test_golden_placeholders_text_json_and_arguments(scrub):
    inv = make_inv(CONVERSATION, content="Thanks John, I found your profile.",
                   tool_calls=[ToolCall("book", {"passenger": {"first_name": "John", "last_name": "Smith"}, "flight": "HAT136"})])
    (out,), report = scrub([inv], surrogates="placeholder")
    m = out.request.messages
    assert m[0]["content"] == "You are a travel agent."
    assert m[1]["content"] == ("Hi, I'm <PERSON_1> <PERSON_2>, email <EMAIL_ADDRESS_1>, call <PHONE_NUMBER_1>. "
                               "My card is <CREDIT_CARD_1>.")
    assert m[2]["tool_calls"][0]["function"]["arguments"] == {"email": "<EMAIL_ADDRESS_1>"}
    assert m[3]["content"] == ('{"name": {"first_name": "<PERSON_1>", "last_name": "<PERSON_2>"}, "email": "<EMAIL_ADDRESS_1>", '
                               '"dob": "<DATE_OF_BIRTH_1>", "flight": "HAT136", "address": {"address1": "<STREET_ADDRESS_1>", '
                               '"city": "Austin", "zip": "<ZIP_CODE_1>"}}')
    assert out.response.content == "Thanks <PERSON_1>, I found your profile."
    assert out.response.tool_calls[0].arguments == {"passenger": {"first_name": "<PERSON_1>", "last_name": "<PERSON_2>"}, "flight": "HAT136"}
    assert report["entities"]["PERSON"]["values"] == 2
    assert report["fields"]["tool"]["EMAIL_ADDRESS"] == 1 and report["fields"]["user"]["CREDIT_CARD"] == 1


def test_golden_secrets(scrub):
    text = ("key sk-proj-abcdefghijklmnopqrstuvwxyz123456 and sk-ant-api03-abcdefghijklmnopqrstuvwx, AWS AKIAIOSFODNN7EXAMPLE, "
            "gh ghp_abcdefghijklmnopqrstuvwxyz0123456789, Authorization: Bearer abcdef0123456789abcdef, "
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U "
            "db postgres://admin:hunter22secret@db.internal:5432/x password=Sup3rS3cret!")
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"
    inv = make_inv([{"role": "user", "content": text}, {"role": "tool", "content": pem}],
                   content='{"api_key": "abc123xyz789", "password": "p@ssw0rd!"}')
    (out,), _ = scrub([inv], surrogates="placeholder")
    assert out.request.messages[0]["content"] == (
        "key <API_KEY_1> and <API_KEY_2>, AWS <API_KEY_3>, gh <API_KEY_4>, Authorization: Bearer <AUTH_TOKEN_1>, "
        "jwt <AUTH_TOKEN_2> db postgres://admin:<PASSWORD_1>@db.internal:5432/x password=<PASSWORD_2>")
    assert out.request.messages[1]["content"] == "<PRIVATE_KEY_1>"
    assert json.loads(out.response.content) == {"api_key": "<API_KEY_5>", "password": "<PASSWORD_3>"}


def test_json_stays_valid_keys_untouched_and_layout_kept(scrub):
    compact = '{"email":"ann@corp.example.com","items":[{"owner_name":"Ann Lee","note":"call 415-555-0199"}]}'
    inv = make_inv([{"role": "tool", "content": compact}], content="ok")
    (out,), _ = scrub([inv], surrogates="placeholder")
    new = out.request.messages[0]["content"]
    assert '":"' in new  # compact separators kept
    parsed = json.loads(new)
    assert list(parsed) == ["email", "items"] and list(parsed["items"][0]) == ["owner_name", "note"]
    assert parsed["email"] == "<EMAIL_ADDRESS_1>" and parsed["items"][0]["note"] == "call <PHONE_NUMBER_1>"


def test_no_pii_means_no_change(scrub):
    msgs = [{"role": "user", "content": "What is the baggage allowance in economy?"},
            {"role": "tool", "content": '{"flight": "HAT136", "date": "2024-05-20", "seats": 12}'}]
    (out,), report = scrub([make_inv(msgs, content="Two bags.")])
    assert out.request.messages == msgs and out.response.content == "Two bags."
    assert all(e["values"] == 0 for e in report["entities"].values())


def test_dates_times_and_sums_are_not_phone_numbers(scrub):
    msgs = [{"role": "system", "content": "The current time is 2024-05-15 15:00:00 EST."},
            {"role": "user", "content": "Compute 1200 - 500 - 300 for me, and call me at 415-555-0132."}]
    (out,), _ = scrub([make_inv(msgs, content="ok")], surrogates="placeholder")
    assert out.request.messages[0]["content"] == msgs[0]["content"]
    assert out.request.messages[1]["content"] == "Compute 1200 - 500 - 300 for me, and call me at <PHONE_NUMBER_1>."


def _scrub_text(scrub, text: str, content: str = "ok") -> str:
    (out,), _ = scrub([make_inv([{"role": "user", "content": text}], content=content)], surrogates="placeholder")
    return out.request.messages[0]["content"]


def test_golden_names_beyond_ascii_initials_lists_and_lower_case(scrub):
    # Names in any script, with middle initials, in a list with a found name, typed in lower case after a cue.
    assert _scrub_text(scrub, "I'm Jožef Pušaver. We met Faina D. Yefremova yesterday.") == (
        "I'm <PERSON_1> <PERSON_2>. We met <PERSON_3> D. <PERSON_4> yesterday.")
    assert _scrub_text(scrub, "The company is the brainchild of our 3 founders: Kónya, Becker and Vasquez.") == (
        "The company is the brainchild of our 3 founders: <PERSON_1>, <PERSON_2> and <PERSON_3>.")
    assert _scrub_text(scrub, "hi, my name is lena andersson and i need help") == (
        "hi, my name is <PERSON_1> <PERSON_2> and i need help")
    # A reply word before a name is no second person.
    (out,), _ = scrub([make_inv([{"role": "user", "content": "My name is Ivan Smith."}], content="Sure, Ivan and Maria.")],
                      surrogates="placeholder")
    assert out.response.content.startswith("Sure, <PERSON_1> and ")


def test_golden_dialogue_speakers_but_not_transcript_roles(scrub):
    dialogue = "Ubul: What a wife.\nNicole: Remember me, Mary?"
    assert _scrub_text(scrub, dialogue) == "<PERSON_1>: What a wife.\n<PERSON_2>: Remember me, <PERSON_3>?"
    transcript = "User: I want to fly to Boston.\nAssistant: Sure, which date?\nUser: Friday."
    assert _scrub_text(scrub, transcript) == transcript


def test_golden_phone_numbers_by_cue_country_code_or_north_american_shape(scrub):
    text = "Mobile: 0490 39 07 81\nDesk: +1-903-140-4508x769\n655 437 108 office\nFax: 345-899-3560x4587"
    assert _scrub_text(scrub, text) == (
        "Mobile: <PHONE_NUMBER_1>\nDesk: <PHONE_NUMBER_2>\n<PHONE_NUMBER_3> office\nFax: <PHONE_NUMBER_4>")
    # Dates, times and sums keep their digits.
    kept = "Departure: 2024-05-12 14:00, total $1,250.00, seats 12 14 16"
    assert _scrub_text(scrub, kept) == kept


def test_golden_address_blocks_whole(scrub):
    letter = "Gregory Kudryashov\n\n233 Erzsébet tér 19.\nSuite 282\nDomoszló\nHungary 34796"
    assert _scrub_text(scrub, letter) == "<PERSON_1> <PERSON_2>\n\n<STREET_ADDRESS_1>"
    assert _scrub_text(scrub, "The restaurant is at 17151 2450 Crown St") == "The restaurant is at <STREET_ADDRESS_1>"
    assert _scrub_text(scrub, "Meet at the corner of 11 Botley Road and Herceg Gateway.") == (
        "Meet at the corner of <STREET_ADDRESS_1>.")
    # Amounts, times and dates next to capitalised words are no address.
    kept = "- **Total Additional Cost:** $1,008\n\nOption 3 is cheapest. Arrival: 16:00 EST\n\n2 bags on 5 May 2024."
    assert _scrub_text(scrub, kept) == kept


def test_golden_identity_numbers_lower_case_iban_and_zip_by_cue(scrub):
    text = "my iban is gb42nawi04454264788619, my driver's license number is F162823540116 and my zip code is 35350"
    assert _scrub_text(scrub, text) == (
        "my iban is <IBAN_CODE_1>, my driver's license number is <US_DRIVER_LICENSE_1> and my zip code is <ZIP_CODE_1>")
    # An IBAN-shaped string with wrong check digits is left alone.
    assert _scrub_text(scrub, "ref gb41nawi04454264788619") == "ref gb41nawi04454264788619"


def test_places_named_like_people_stay_when_the_log_calls_them_places(scrub):
    # "Chicago" is a place elsewhere in the log, so "Chicago O'Hare" is one too; the passenger is scrubbed.
    invs = [make_inv([{"role": "user", "content": f"I fly from Chicago to Denver on day {i}."}], content="ok", session=f"s{i}")
            for i in range(3)]
    invs.append(make_inv([{"role": "user", "content": "My name is Amelia Sanchez."}],
                         content="Amelia Sanchez, your reservation from Chicago O'Hare (ORD) to Philadelphia is confirmed.",
                         session="s9"))
    out, _ = scrub(invs, surrogates="placeholder")
    assert out[-1].response.content == "<PERSON_1> <PERSON_2>, your reservation from Chicago O'Hare (ORD) to Philadelphia is confirmed."
