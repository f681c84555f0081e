"""Scrubbing keeps the agent's own words: instructions, tool docs and canned replies it wrote in many
conversations stay byte-identical, while the personal data in them and around them is replaced."""

import json

from slmconvert.invocation import Invocation, Request, Response, Source, ToolCall
from slmconvert.scrub.engine import Scrubber, embedded_json
from slmconvert.scrub.policy import ScrubPolicy

SYSTEM = (
    "You are the assistant of Each Plan Telecom and of the FHIR server at http://10.20.30.40:8080/fhir/.\n"
    "Each customer has a Plan: Basic Connectivity (10 Mbps) or Fiber Max.\n"
    "On Android, open Chrome and read the speed in Mbps before you escalate.\n"
    "Drug codes are NDC numbers such as 0409-4888-02; quote them exactly.\n"
    "Support line for staff: call 1-800-555-0199."
)
TOOLS = [{"type": "function", "function": {"name": "get_patient", "description": "Look up a Patient by MRN on Verizon Band 66 sites.",
                                           "parameters": {"type": "object", "properties": {"mrn": {"type": "string"}}}}}]
CANNED = "On Android, open Chrome and read the speed in Mbps before you escalate."
PATIENTS = [("Kowalski", "Anna", "1961-04-12", "94107", "S6541353"), ("Okafor", "Chidi", "1975-09-30", "60614", "S1234987"),
            ("Lindqvist", "Maja", "1988-01-05", "02139", "S7777012"), ("Haddad", "Omar", "1952-12-24", "73301", "S5550123"),
            ("Moreau", "Claire", "1990-07-19", "30301", "S9090909"), ("Tanaka", "Hiro", "1969-03-03", "98101", "S2468013")]


def _session(i: int) -> list[Invocation]:
    family, given, dob, zip_code, mrn = PATIENTS[i]
    resource = {"resourceType": "Patient", "id": mrn, "name": [{"family": family, "given": [given]}], "birthDate": dob,
                "address": [{"line": [f"{10 + i} Elm Street"], "postalCode": zip_code}],
                "identifier": [{"system": "urn:mrn", "value": mrn}], "account_number_last_4": f"{4321 + i}"}
    url = f"http://10.20.30.40:8080/fhir/Observation?patient={mrn}&code=4548-4"
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Hi, I'm {given} {family}. My internet is slow, and what is my last A1C? MRN {mrn}."},
        {"role": "assistant", "content": CANNED},
        {"role": "user", "content": "Done, it says 3 Mbps."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "get_patient", "arguments": {"mrn": mrn}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Here is the patient record: " + json.dumps(resource)},
    ]
    s = f"conv-{i}"
    return [Invocation(id=f"{s}-0", source=Source("t", "m", "x"), session_id=s, step=0,
                       request=Request(messages=msgs[:2], tools=TOOLS), response=Response(content=CANNED)),
            Invocation(id=f"{s}-1", source=Source("t", "m", "x"), session_id=s, step=1,
                       request=Request(messages=msgs, tools=TOOLS),
                       response=Response(content=None, tool_calls=[ToolCall("GET", {"url": url})]))]


def test_the_agents_words_stay_byte_identical_and_the_personal_data_goes(scrub):
    invs = [inv for i in range(len(PATIENTS)) for inv in _session(i)]
    out, report = scrub(invs, surrogates="fake")
    by_id = {o.id: o for o in out}
    for i, (family, given, dob, zip_code, mrn) in enumerate(PATIENTS):
        first, second = by_id[f"conv-{i}-0"], by_id[f"conv-{i}-1"]
        msgs = second.request.messages
        # instructions, canned reply and tool docs: byte-identical
        assert msgs[0]["content"] == SYSTEM and first.request.messages[0]["content"] == SYSTEM
        assert first.response.content == CANNED and msgs[2]["content"] == CANNED
        assert second.request.tools == TOOLS
        # the personal data of the conversation is gone, everywhere
        text = json.dumps([m["content"] for m in msgs]) + json.dumps(second.response.tool_calls[0].arguments)
        for value in (family, given, dob, zip_code, mrn, f"{10 + i} Elm Street", f"{4321 + i}"):
            assert value not in text, value
        # the embedded FHIR resource is still JSON after its sentence, with its keys
        tool_text = msgs[5]["content"]
        assert tool_text.startswith("Here is the patient record: {")
        resource = json.loads(tool_text[len("Here is the patient record: "):])
        assert resource["resourceType"] == "Patient" and resource["name"][0]["family"] != family
        # the id the agent must copy into its URL got one surrogate: the URL stays learnable
        fake = resource["identifier"][0]["value"]
        assert fake != mrn and resource["id"] == fake
        assert msgs[4]["tool_calls"][0]["function"]["arguments"]["mrn"] == fake
        assert second.response.tool_calls[0].arguments["url"] == f"http://10.20.30.40:8080/fhir/Observation?patient={fake}&code=4548-4"
    # the template vocabulary is recorded so that later runs and `serve` keep it too
    kept = set(report["template_values_kept"])
    assert {"Android", "Chrome", "Basic", "Connectivity", "Each", "Plan", "10.20.30.40"} <= kept
    assert not kept & ({p[0] for p in PATIENTS} | {p[1] for p in PATIENTS})


def test_a_personal_value_is_no_template_because_the_agent_repeats_it_within_one_conversation(scrub):
    msgs = [{"role": "system", "content": "You help customers."}, {"role": "user", "content": "I'm Zofia Brzezinska."}]
    invs = [Invocation(id=f"x{k}", source=Source("t", "m", "x"), session_id="only", step=k, request=Request(messages=msgs),
                       response=Response(content="Thank you, Zofia Brzezinska.")) for k in range(6)]
    out, report = scrub(invs, surrogates="placeholder")
    assert all("Zofia" not in o.response.content for o in out) and "Zofia" not in report["template_values_kept"]


def test_basic_auth_is_a_token_only_when_it_is_one():
    from slmconvert.scrub.recognizers import secret_recognizers

    rec = next(r for r in secret_recognizers() if r.name == "AuthTokenRecognizer")
    hits = lambda t: [t[r.start:r.end] for r in rec.analyze(t, entities=["AUTH_TOKEN"], nlp_artifacts=None)]  # noqa: E731
    assert hits("Authorization: Basic dXNlcjpzM2NyZXQ=") == ["dXNlcjpzM2NyZXQ="]
    assert hits("Your plan is Basic Connectivity.") == [] and hits("Basic Authentication is off") == []


def test_drug_codes_are_not_phone_numbers_and_record_numbers_are_identifiers(tmp_path):
    scrubber = Scrubber(ScrubPolicy(), b"k" * 32, "placeholder")
    scrubber.detect_all([("Give NDC 0409-4888-02 twice daily.", None), ("The patient S6541353 has an MRN of 7654321.", None)])
    assert scrubber.detections("Give NDC 0409-4888-02 twice daily.", None) == []
    text = "The patient S6541353 has an MRN of 7654321."
    found = {text[d.start:d.end] for d in scrubber.detections(text, None) if d.entity == "MEDICAL_RECORD_NUMBER"}
    assert found == {"S6541353", "7654321"}


def test_json_after_a_sentence_is_found_and_json_like_prose_is_not():
    parts = embedded_json('Result: {"a": 1} and [{"b": 2}] end')
    assert [v for _, v in parts if v is not None] == [{"a": 1}, [{"b": 2}]]
    assert "".join(p for p, _ in parts) == 'Result: {"a": 1} and [{"b": 2}] end'
    assert embedded_json("pick one of [1, 2] or {x}") is None
