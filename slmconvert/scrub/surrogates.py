"""Surrogate values: realistic fakes of the same type and shape, deterministic per (session, value).

Determinism comes from a keyed hash (HMAC-SHA256 with the workspace's scrub key) of the
session, the entity type and the value: the same value in the same session always gets the
same fake, across runs, with no stored table of originals. E-mails stay e-mails, card numbers
stay Luhn-valid, IBANs keep a valid checksum, phone numbers keep their punctuation.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import re
import string
from datetime import date, timedelta

KEEP_PREFIXES = ("sk-ant-", "sk-proj-", "sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "AKIA", "ASIA", "AIza",
                 "xoxb-", "xoxp-", "hf_", "eyJ", "sk_live_", "sk_test_")


def _rng(key: bytes, *parts: str) -> random.Random:
    digest = hmac.new(key, "\x1f".join(parts).encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def shape(value: str, rng: random.Random, keep_prefix: int = 0) -> str:
    """Same length and character classes: digits to digits, letters to letters (case kept)."""
    out = list(value[:keep_prefix])
    for ch in value[keep_prefix:]:
        if ch.isdigit():
            out.append(rng.choice(string.digits))
        elif ch.isalpha() and ch.isascii():
            c = rng.choice(string.ascii_lowercase)
            out.append(c.upper() if ch.isupper() else c)
        else:
            out.append(ch)
    return "".join(out)


def luhn_complete(digits: str) -> str:
    """Append the Luhn check digit to `digits`."""
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2 == 0:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return digits + str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    digits = re.sub(r"\D", "", number)
    return len(digits) > 1 and luhn_complete(digits[:-1]) == digits


def _card(value: str, rng: random.Random) -> str:
    digits = re.sub(r"\D", "", value)
    if len(digits) < 12:
        return shape(value, rng)
    body = digits[0] + "".join(rng.choice(string.digits) for _ in range(len(digits) - 2))
    new = iter(luhn_complete(body))
    return "".join(next(new) if c.isdigit() else c for c in value)


def iban_valid(value: str) -> bool:
    """ISO 13616 check digits (mod 97), any case, spaces allowed."""
    compact = re.sub(r"\s", "", value).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{10,30}", compact):
        return False
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def _iban(value: str, rng: random.Random) -> str:
    compact = re.sub(r"\s", "", value).upper()
    if len(compact) < 8 or not compact[:2].isalpha():
        return shape(value, rng)
    bban = shape(compact[4:], rng)
    numeric = "".join(str(int(c, 36)) for c in bban + compact[:2] + "00")
    check = 98 - int(numeric) % 97
    new = f"{compact[:2]}{check:02d}{bban}"
    if " " in value.strip():
        new = " ".join(new[i:i + 4] for i in range(0, len(new), 4))
    return new


_DATE_FORMATS = ("%Y-%m-%d", "%m/%d/%Y", "%d/%m/%Y", "%d.%m.%Y", "%Y/%m/%d", "%B %d, %Y", "%d %B %Y")


def _dob(value: str, rng: random.Random) -> str:
    from datetime import datetime

    for fmt in _DATE_FORMATS:
        try:
            datetime.strptime(value.strip(), fmt)
        except ValueError:
            continue
        d = date(1950, 1, 1) + timedelta(days=rng.randrange(0, 55 * 365))
        return d.strftime(fmt)
    return shape(value, rng)


def _secret(value: str, rng: random.Random) -> str:
    prefix = next((p for p in KEEP_PREFIXES if value.startswith(p)), "")
    return shape(value, rng, keep_prefix=len(prefix))


class SurrogateFactory:
    """Makes the replacement text for a detected value, as fakes or as typed placeholders."""

    def __init__(self, key: bytes, mode: str = "fake"):
        from faker import Faker

        self.key = key
        self.mode = mode
        self.fake = Faker("en_US")
        self.placeholders: dict[tuple[str, str], dict[str, str]] = {}

    def __call__(self, session: str, entity: str, value: str, position: int = 0) -> str:
        if self.mode == "placeholder":
            table = self.placeholders.setdefault((session, entity), {})
            if value not in table:
                table[value] = f"<{entity}_{len(table) + 1}>"
            return table[value]
        rng = _rng(self.key, session, entity, value)
        if entity == "PRIVATE_KEY":
            return "<PRIVATE_KEY>"
        if entity in ("API_KEY", "AUTH_TOKEN", "PASSWORD"):
            return _secret(value, rng)
        if entity == "CREDIT_CARD":
            return _card(value, rng)
        if entity == "IBAN_CODE":
            return _iban(value, rng)
        if entity == "DATE_OF_BIRTH":
            return _dob(value, rng)
        if entity in ("PHONE_NUMBER", "US_SSN", "ZIP_CODE", "US_DRIVER_LICENSE", "US_PASSPORT", "US_BANK_NUMBER",
                      "MEDICAL_RECORD_NUMBER"):
            return shape(value, rng)
        self.fake.seed_instance(rng.getrandbits(32))
        f = self.fake
        if entity == "PERSON":
            out = f.first_name() if position == 0 else f.last_name()
            return out.upper() if value.isupper() else out.lower() if value.islower() else out
        if entity == "EMAIL_ADDRESS":
            return f"{f.user_name()}{rng.randint(1, 99)}@{f.free_email_domain()}"
        if entity == "USERNAME":
            if re.fullmatch(r"[a-z]+_[a-z]+_\d+", value):
                return f"{f.first_name().lower()}_{f.last_name().lower()}_{shape(value.rsplit('_', 1)[1], rng)}"
            return shape(value, rng)
        if entity == "STREET_ADDRESS":
            unit = re.match(r"(?i)(apt\.?|apartment|suite|ste\.?|unit|flat|room|floor|fl\.)\s*#?", value)
            if unit:
                return shape(value, rng, keep_prefix=unit.end())
            return f.street_address() if not value[:1].isalpha() or any(c.isdigit() for c in value) else f.street_name()
        if entity == "LOCATION":
            return f.city()
        if entity == "IP_ADDRESS":
            return f.ipv6() if ":" in value else f.ipv4_public()
        if entity == "ORGANIZATION":
            return f.company()
        return shape(value, rng)

    def mask(self, value: str) -> str:
        keep = 4 if len(value) > 8 else 0
        return "".join("*" if c.isalnum() else c for c in value[: len(value) - keep]) + value[len(value) - keep:]
